"""The paper's workflow against a running server, with the client library (rulewright.client).

1. sample an album of faces;
2. choose regions: the copy, paste and context boxes of an edit spec, drawn on their faces;
3. rewrite the model with them, with a progress bar;
4. compare held-out faces (no part of the edit) before and after;
5. promote the new version to ``production``;
6. roll ``production`` back and check that it renders the original pixels exactly.

    rulewright serve &                                   # or any server holding the faces model
    python examples/workflow.py --address 127.0.0.1:50051 --out out/workflow
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from rulewright.client import Client, Progress, RewriteResult
from rulewright.client.images import draw_boxes, grid

HELD_OUT = list(range(50_000, 50_008))     # faces that take no part in the edit


def main(argv: list[str] | None = None) -> int:
    """Run the workflow; exits 0 if the rollback restored the original pixels."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--token", help="bearer token (an editor's to rewrite, an admin's to move aliases)")
    p.add_argument("--model", default="faces", help="model to edit")
    p.add_argument("--edit", default=str(Path(__file__).parent / "edits" / "glasses.json"), help="edit spec JSON")
    p.add_argument("--steps", type=int, help="override the spec's optimization steps (fewer: faster, weaker)")
    p.add_argument("--quality", choices=("draft", "final"), help="override the spec's quality (draft: seconds, rougher)")
    p.add_argument("--out", default="out/workflow", help="folder for the PNGs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with Client(args.address, args.token) as rw:
        # 1. an album: look for what to copy and where to paste it
        production = rw.alias(args.model, "production")
        base = f"{args.model}/{production.version}"           # the version the edit starts from
        album = rw.sample(base, range(48))
        grid([im.image for im in album]).save(out / "album.png")
        print(f"album of {len(album)} faces from {album[0].version}: {out / 'album.png'}")

        # 2. the regions chosen (here: read from the spec), outlined on their faces
        spec = json.loads(Path(args.edit).read_text())
        if args.steps:
            spec["steps"] = args.steps
        if args.quality:
            spec["quality"] = args.quality
        regions = [("copy", spec["copy"])] + [("paste", r) for r in spec["paste"]] + \
                  [("context", r) for r in spec.get("context", [])]
        faces = {im.seed: im.image for im in rw.sample(base, sorted({r["seed"] for _, r in regions}))}
        colors = {"copy": "lime", "paste": "red", "context": "cyan"}
        grid([draw_boxes(faces[r["seed"]], [r["box"]], colors[kind]) for kind, r in regions], scale=1) \
            .save(out / "regions.png")
        print(f"copy seed {spec['copy']['seed']} onto seeds {[r['seed'] for r in spec['paste']]}: "
              f"{out / 'regions.png'}")

        # 3. the rewrite: progress while it optimizes, then the new version
        result = None
        with tqdm(desc=f"rewrite ({spec.get('name', 'edit')})", unit="step") as bar:
            for event in rw.rewrite(base, spec):
                if isinstance(event, Progress) and event.stage == "optimize":
                    bar.total = event.steps
                    bar.update(event.step - bar.n)
                elif isinstance(event, RewriteResult):
                    result = event
        new = result.version
        print(f"created {new.name} (parent {result.parent})")

        # 4. before and after, on faces that took no part in the edit
        before = rw.sample(base, HELD_OUT)
        after = rw.sample(f"{args.model}/{new.number}", HELD_OUT)
        grid([im.image for im in before + after]).save(out / "before_after.png")
        changed = sum(a.png != b.png for a, b in zip(before, after))
        print(f"held-out faces before (top) and after (bottom), {changed} of {len(HELD_OUT)} changed: "
              f"{out / 'before_after.png'}")

        # 5. promote: compare-and-set on the state read in step 1
        rw.set_alias(args.model, "production", new.number, etag=production.etag, reason="workflow: promote")
        promoted = rw.sample(f"{args.model}@production", HELD_OUT)
        print(f"production → version {new.number}")

        # 6. roll back, and check the pixels
        rw.rollback(args.model, "production", reason="workflow: roll back")
        rolled = rw.sample(f"{args.model}@production", HELD_OUT)
        same = [im.png for im in rolled] == [im.png for im in before]
        print(f"production rolled back to {rolled[0].version}: "
              f"{'the original pixels, exactly' if same else 'PIXELS DIFFER'}")
        for move in rw.alias_history(args.model, "production")[-2:]:
            print(f"  production: {move.from_version} → {move.to_version} by {move.author} ({move.reason})")
        return 0 if same and [im.png for im in promoted] == [im.png for im in after] else 1


if __name__ == "__main__":
    raise SystemExit(main())
