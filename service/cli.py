"""``rulewright-engine``: the engine from the command line, before (and beside) the server.

Subcommands:
- ``import-faces``: fetch and convert the demo model; prints the safetensors path.
- ``import-pkl``: convert an NVIDIA StyleGAN2-ADA network pickle (read as data, never run) to a
  ``stylegan2`` safetensors file; prints what it found.
- ``album``: sample seeds into one PNG grid.
- ``layers``: list a model's rewritable layers and the default one.
- ``stats``: compute a layer's key second moment over N samples, with a progress bar.
- ``serve``: the gRPC server, embedded default (filesystem registry, faces model as ``faces``);
  the same as ``rulewright serve`` (``server_main``), whose settings live in server/config.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image


def parse_seeds(text: str) -> list[int]:
    """Seeds from "0-15", "1,5,9" or a mix like "0-3,10"."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"empty seed range {part!r}")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return seeds


def _load(args: argparse.Namespace):
    from rulewright.service.engine.device import configure_determinism, select_device
    from rulewright.service.engine.loading import load_generator
    from rulewright.service.importers.faces import import_faces

    source = import_faces(args.cache_dir) if args.model == "faces" else Path(args.model)
    configure_determinism()
    return load_generator(source).to(select_device(args.device))


def cmd_import_faces(args: argparse.Namespace) -> int:
    from rulewright.service.importers.faces import import_faces

    print(import_faces(args.cache_dir))
    return 0


def cmd_import_pkl(args: argparse.Namespace) -> int:
    import os

    from rulewright.service.engine.nvidia_pkl import convert_network_pickle, to_safetensors

    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_suffix(".safetensors")
    data = to_safetensors(conversion := convert_network_pickle(src.read_bytes()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)        # never a half-written model under the final name
    print(json.dumps({"out": str(out), "arch": "stylegan2", "source": conversion.source}, indent=2))
    return 0


def cmd_album(args: argparse.Namespace) -> int:
    from rulewright.service.engine.sampling import grid, sample

    model = _load(args)
    images = sample(model, seeds=args.seeds, truncation=args.truncation, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = grid(images, columns=args.columns).numpy()
    Image.fromarray(picture).resize((picture.shape[1] * args.scale, picture.shape[0] * args.scale),
                                    Image.NEAREST).save(out)
    print(f"wrote {len(args.seeds)} samples of {model.arch} ({model.resolution}x{model.resolution}) to {out}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    model = _load(args)
    print(json.dumps({"arch": model.arch, "default_layer": model.default_layer(),
                      "layers": [info.to_dict() for info in model.layer_infos()]}, indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from rulewright.service.engine.progress import Progress
    from rulewright.service.engine.stats import key_moment

    model = _load(args)
    layer = args.layer or model.default_layer()
    with tqdm(total=args.samples, unit="sample", desc=f"C at {layer}", file=sys.stderr) as bar:
        stat = key_moment(model, layer, range(args.samples), batch_size=args.batch_size,
                          progress=Progress(lambda e: bar.update(e.done - bar.n)))
    eig = torch.linalg.eigvalsh(stat.moment())
    print(json.dumps({"layer": layer, "keys": stat.count, "dim": stat.dim,
                      "condition_number": float(eig[-1] / eig[0].clamp_min(1e-300))}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    # gRPC core's own info lines (TLS handshake failures) are not JSON; keep only its errors.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from rulewright.service.server.app import configure_logging, serve
    from rulewright.service.server.config import resolve

    config = resolve(args)          # ConfigError, TlsConfigError, AuthConfigError: ValueErrors, one line, exit 2
    configure_logging()
    return serve(config, on_ready=lambda port, web_url: print(ready_line(config.address, port, web_url), flush=True))


def ready_line(address: str, port: int, web_url: str | None) -> str:
    """The one line for a person at the terminal once serving: where gRPC and the editor are."""
    # On stdout, so that stderr stays JSON lines for log collectors.
    host = address.rsplit(":", 1)[0]
    editor = f"editor at {web_url}/" if web_url else "editor off (--web-address)"
    return f"rulewright: gRPC on {host}:{port}, {editor} (logs: JSON on stderr; Ctrl-C stops)"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (server/config.py's settings)."""
    from rulewright.service.server.config import add_arguments

    add_arguments(p)


def build_server_parser() -> argparse.ArgumentParser:
    """The ``rulewright`` parser: ``rulewright serve`` runs the service."""
    parser = argparse.ArgumentParser(prog="rulewright", description="rulewright: rewrite the rules of a GAN over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gRPC server; with no settings, the embedded default "
                                     "(filesystem registry under ./data, faces model, 127.0.0.1:50051)")
    add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (each flag documented by its help)."""
    parser = argparse.ArgumentParser(prog="rulewright-engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model: bool = True) -> None:
        p.add_argument("--cache-dir", default=None,
                       help="where downloaded wheels and converted models live (default $RULEWRIGHT_CACHE_DIR or ~/.cache/rulewright)")
        if model:
            p.add_argument("--model", default="faces",
                           help="'faces' (the demo DCGAN) or a .safetensors / weights-only torch checkpoint path")
            p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
            p.add_argument("--batch-size", type=int, default=16, help="samples per forward pass")

    p = sub.add_parser("import-faces", help="fetch the demo model and print its safetensors path")
    common(p, model=False)
    p.set_defaults(fn=cmd_import_faces)

    p = sub.add_parser("import-pkl", help="convert an NVIDIA StyleGAN2-ADA network pickle (read as data, "
                                          "never run) to a stylegan2 safetensors file")
    p.add_argument("file", help="the network pickle (.pkl), e.g. a training snapshot or a published model")
    p.add_argument("--out", default=None, help="safetensors file to write (default: FILE with suffix .safetensors)")
    p.set_defaults(fn=cmd_import_pkl)

    p = sub.add_parser("album", help="sample seeds into one PNG grid")
    common(p)
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-31"), help="e.g. 0-31 or 3,7,11")
    p.add_argument("--truncation", type=float, default=1.0, help="1 = none (StyleGAN2 only)")
    p.add_argument("--columns", type=int, default=8, help="images per row")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour enlargement of the PNG")
    p.add_argument("--out", default="out/album.png", help="PNG file to write")
    p.set_defaults(fn=cmd_album)

    p = sub.add_parser("layers", help="list the rewritable layers as JSON")
    common(p)
    p.set_defaults(fn=cmd_layers)

    p = sub.add_parser("stats", help="second moment of a layer's keys, with a progress bar")
    common(p)
    p.add_argument("--layer", default=None, help="layer name (default: the model's default layer)")
    p.add_argument("--samples", type=int, default=1000, help="number of seeds (0..N-1)")
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("serve", help="run the gRPC server (embedded default: filesystem registry, faces model)")
    add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one subcommand; known errors print one line and exit 2."""
    from rulewright.registry.errors import RegistryError

    from rulewright.service.engine.generators.base import StateDictMismatch
    from rulewright.service.engine.loading import CheckpointError
    from rulewright.service.errors import Error
    from rulewright.service.importers.faces import FacesImportError

    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (FacesImportError, StateDictMismatch, CheckpointError, RegistryError, Error, LookupError, ValueError,
            OSError) as exc:                                  # Error: e.g. RayUnavailable at serve's start
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def server_main(argv: list[str] | None = None) -> int:
    """The ``rulewright`` command (today: ``rulewright serve``)."""
    return main(argv, build_server_parser())


if __name__ == "__main__":
    sys.exit(main())
