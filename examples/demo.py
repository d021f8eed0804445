"""The main job end to end, against a real server over gRPC: ``make demo`` runs it.

1. start the embedded server (``rulewright serve``: filesystem registry under
   ``out/demo-data``, faces imported as version 1 with alias ``production``);
2. sample an album of faces;
3. run an example edit (``examples/edits/glasses.json``) through the Rewrite RPC, with a
   progress bar;
4. point ``production`` at the new version, sample held-out faces before and after;
5. roll ``production`` back and check that it renders the original pixels exactly;
6. write the PNGs under ``out/`` and say where they are.

Plain Python over the generated stubs (``rulewright.v1``), so it shows the wire API as any
client sees it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tqdm import tqdm

from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import images_pb2, registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

HELD_OUT = list(range(50_000, 50_008))     # faces that took no part in the edit


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_pb(d: dict) -> edit_pb2.EditSpec:
    """An edit spec JSON (examples/edits/*.json) as the API's EditSpec: the file is the message's
    JSON form (unset fields: server defaults)."""
    return json_format.ParseDict(d, edit_pb2.EditSpec())


def grid(images: list[Image.Image], columns: int = 8, scale: int = 2) -> Image.Image:
    """Images side by side, ``columns`` per row, enlarged ``scale``× (nearest)."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)


def sample(stub: gen_grpc.GeneratorServiceStub, model: str, seeds: list[int]) -> tuple[str, list[Image.Image], list[bytes]]:
    """(resolved version, images, PNG bytes) for seeds."""
    resp = stub.Sample(gen.SampleRequest(model=model, seeds=seeds, image_format=images_pb2.IMAGE_FORMAT_PNG),
                       timeout=120)
    pngs = [im.data for im in resp.images]
    return resp.version, [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], pngs


def production(registry: reg_grpc.RegistryServiceStub) -> tuple[int, str]:
    """(version, etag) that alias ``production`` of ``faces`` points to now."""
    model = registry.GetModel(reg.GetModelRequest(name="models/faces"), timeout=30)
    alias = next(a for a in model.aliases if a.name.endswith("production"))
    return alias.version, alias.etag


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints where the pictures are."""
    p = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out", help="folder for the PNGs and the demo's data directory")
    p.add_argument("--edit", default="examples/edits/glasses.json", help="edit spec JSON to run")
    p.add_argument("--steps", type=int, default=0, help="override the edit's optimization steps (0: the spec's)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    # `rulewright serve`, run through this interpreter so no PATH lookup is needed
    server = subprocess.Popen([sys.executable, "-c", "import sys; from rulewright.service.cli import server_main; "
                               "sys.exit(server_main())", "serve", "--data-dir",
                               str(out / "demo-data"), "--address", address], stderr=open(out / "demo-server.log", "w"))
    try:
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.time() + 300
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not come up; see {out / 'demo-server.log'}")
            time.sleep(0.5)
        generator, registry = gen_grpc.GeneratorServiceStub(channel), reg_grpc.RegistryServiceStub(channel)
        print(f"server up at {address} (log: {out / 'demo-server.log'})")

        version, album, _ = sample(generator, "faces@production", list(range(32)))
        grid(album).save(out / "album.png")
        print(f"album of 32 faces from {version}: {out / 'album.png'}")

        spec = json.loads(Path(args.edit).read_text())
        if args.steps:
            spec["steps"] = args.steps
        request = gen.RewriteRequest(model="faces@production", spec=spec_pb(spec), preview_seeds=HELD_OUT[:4],
                                     preview_format=images_pb2.IMAGE_FORMAT_PNG)
        result = None
        with tqdm(total=spec.get("steps", 50), desc=f"rewrite ({Path(args.edit).stem})", unit="step") as bar:
            for event in generator.Rewrite(request, timeout=1800):
                kind = event.WhichOneof("event")
                if kind == "progress" and event.progress.steps and event.progress.stage == gen.Progress.STAGE_OPTIMIZE:
                    bar.total = event.progress.steps
                    bar.update(event.progress.step - bar.n)
                    if event.progress.HasField("loss"):
                        bar.set_postfix(loss=f"{event.progress.loss:.4f}")
                elif kind == "result":
                    result = event.result
        new = result.version
        print(f"created {new.name} (parent {result.parent})")

        old_version, etag = production(registry)
        registry.SetAlias(reg.SetAliasRequest(name="models/faces/aliases/production", version=new.number, etag=etag,
                                              reason="demo: glasses for everyone"), timeout=30)
        _, before, before_png = sample(generator, f"faces/{old_version}", HELD_OUT)
        now, after, _ = sample(generator, "faces@production", HELD_OUT)
        grid(before, columns=8).save(out / "before.png")
        grid(after, columns=8).save(out / "after.png")
        grid(before + after, columns=8).save(out / "before_after.png")
        print(f"production → {now}; held-out faces before: {out / 'before.png'}, after: {out / 'after.png'}, "
              f"both: {out / 'before_after.png'}")

        _, etag = production(registry)
        registry.RollbackAlias(reg.RollbackAliasRequest(name="models/faces/aliases/production", etag=etag,
                                                        reason="demo: roll back"), timeout=30)
        rolled, _, rolled_png = sample(generator, "faces@production", HELD_OUT)
        same = rolled_png == before_png
        print(f"rolled production back to {rolled}: {'the original pixels, exactly' if same else 'PIXELS DIFFER'}")
        history = registry.ListAliasHistory(reg.ListAliasHistoryRequest(parent="models/faces/aliases/production"),
                                            timeout=30)
        for move in history.moves[-3:]:
            print(f"  production: {move.from_version} → {move.to_version} by {move.author} ({move.reason})")
        return 0 if same else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    raise SystemExit(main())
