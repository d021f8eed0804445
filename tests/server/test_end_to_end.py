"""The service's promises over a real channel, on both backends (embedded, and S3 + Redis):

- an image is named by (version, seed): the same bytes across calls, concurrent batch
  compositions and dynamic batching;
- the faces model imported over ImportModel, the shipped glasses edit run through Rewrite:
  version N+1 changes the eyes of held-out faces and much less elsewhere;
- moving ``production`` back restores the old images exactly.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, images_pb2, registry_service_pb2 as reg

RAW = images_pb2.IMAGE_FORMAT_RAW_RGB8
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "edits"


def pixels(response) -> dict[int, bytes]:
    return {i.seed: i.data for i in response.images}


def test_an_image_is_the_same_bytes_whatever_it_was_batched_with(generator, domain):
    seeds = list(range(12))
    together = pixels(generator.Sample(gen.SampleRequest(model="tiny", seeds=seeds, image_format=RAW), timeout=30))
    sizes: list[int] = []
    domain.metrics = type("Sizes", (), {"observe_batch": lambda self, n: sizes.append(n),
                                        "observe_stats_cache": lambda self, kind, hit: None})()
    domain.batcher.max_delay_s = 0.2         # long enough for every thread below to join one batch
    compositions = [[s] for s in seeds] + [[5, 0, 11], [7, 3], [2, 9, 4, 1, 8]]
    out: list[dict[int, bytes]] = [{} for _ in compositions]
    barrier = threading.Barrier(len(compositions))

    def call(i):
        barrier.wait()
        out[i] = pixels(generator.Sample(gen.SampleRequest(model="tiny/1", seeds=compositions[i], image_format=RAW),
                                         timeout=30))
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(compositions))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for got in out:
        assert got and all(got[s] == together[s] for s in got)
    assert max(sizes) > 3, sizes              # requests really shared forward passes
    png = generator.Sample(gen.SampleRequest(model="tiny", seeds=[5]), timeout=30).images[0].data
    assert png == generator.Sample(gen.SampleRequest(model="tiny", seeds=[7, 5]), timeout=30).images[1].data


def import_faces(registry, faces_path: Path) -> None:
    data = faces_path.read_bytes()
    chunks = [reg.ImportModelRequest(metadata=reg.ImportModelMetadata(model_id="faces", arch="dcgan"))]
    chunks += [reg.ImportModelRequest(chunk=data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
    registry.ImportModel(iter(chunks), timeout=120)


def glasses_spec(steps: int, quality: str = "") -> edit_pb2.EditSpec:
    d = json.loads((EXAMPLES / "glasses.json").read_text())
    box = list
    return edit_pb2.EditSpec(layer=d["layer"], steps=steps, quality=quality,
                             copy=images_pb2.Region(seed=d["copy"]["seed"], box=box(d["copy"]["box"])),
                             paste=[images_pb2.Region(seed=p["seed"], box=box(p["box"])) for p in d["paste"]])


def faces_images(generator, ref: str, seeds: list[int]) -> tuple[str, np.ndarray]:
    r = generator.Sample(gen.SampleRequest(model=ref, seeds=seeds, image_format=RAW), timeout=60)
    return r.version, np.stack([np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in r.images])


@pytest.mark.network
def test_glasses_rewrite_changes_the_eyes_then_a_rollback_restores_every_pixel(generator, registry, faces_path):
    import_faces(registry, faces_path)
    # A draft fit on both stores: what this test checks is the path (stores, aliases, rollback).
    # The default (final) fit runs end to end over a real server in the README's quick start
    # (tests/test_readme.py), and its quality is measured in tests/test_edit_faces.py.
    quality = "draft"
    # ImportModel points the default alias at version 1, so the bare name serves the import at once
    model = registry.GetModel(reg.GetModelRequest(name="models/faces"), timeout=30)
    assert [(a.name, a.version) for a in model.aliases] == [("models/faces/aliases/production", 1)]
    held_out = list(range(50_000, 50_024))         # in no paste, statistic or keep pool of the edit
    _, before = faces_images(generator, "faces@production", held_out)
    result = list(generator.Rewrite(gen.RewriteRequest(model="faces@production", spec=glasses_spec(0, quality)),
                                    timeout=300))[-1].result
    assert result.version.name == "models/faces/versions/2"
    moved = registry.SetAlias(reg.SetAliasRequest(name="models/faces/aliases/production", version=2,
                                                  expected_version=1), timeout=30)
    version, after = faces_images(generator, "faces@production", held_out)
    assert version == "models/faces/versions/2"
    change = np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(axis=-1)   # (N, 64, 64)
    eyes = change[:, 22:38, 8:56].mean()             # the pasted context: the band of the eyes
    chin = change[:, 50:, :].mean()                  # far from it
    # The draft edit (low-rank deltas on every layer, 16 found targets, 50 steps).
    assert eyes > 5 and eyes > 2.5 * chin, (eyes, chin)
    registry.SetAlias(reg.SetAliasRequest(name="models/faces/aliases/production", version=1, etag=moved.etag,
                                          reason="rollback"), timeout=30)
    version, restored = faces_images(generator, "faces@production", held_out)
    assert version == "models/faces/versions/1" and restored.tobytes() == before.tobytes()


def test_samples_drawn_during_a_rewrite_are_untouched_by_its_hooks(generator):
    """Rewrites, statistics, search and dissection hook layers; concurrent samples must not see it."""
    from .test_generator import spec_pb

    seeds = list(range(8))
    before = pixels(generator.Sample(gen.SampleRequest(model="tiny/1", seeds=seeds, image_format=RAW), timeout=30))
    call = generator.Rewrite(gen.RewriteRequest(model="tiny/1", spec=spec_pb(steps=100_000)), timeout=120)
    checked = 0
    for event in call:
        if event.HasField("progress") and event.progress.stage in (gen.Progress.STAGE_STATISTICS,
                                                                   gen.Progress.STAGE_OPTIMIZE):
            got = pixels(generator.Sample(gen.SampleRequest(model="tiny/1", seeds=seeds, image_format=RAW),
                                          timeout=30))
            assert got == before
            checked += 1
            if checked == 12:
                call.cancel()
                break
    assert checked == 12
