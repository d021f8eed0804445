"""Statistics: exact second moments, merges of partials, serialization, quantile sketch accuracy."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine import nethook
from rulewright.service.engine.errors import Cancelled
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.stats import Quantile, SecondMoment, key_moment, load_stat, value_quantiles
from tests.builders import dcgan_state


def test_second_moment_equals_ktk_over_n():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1000, 7, generator=g) + 0.5
    stat = SecondMoment(7)
    for start in range(0, 1000, 128):
        stat.add(k[start : start + 128])
    k64 = k.double()
    assert stat.count == 1000
    exact = k64.T @ k64 / 1000
    # Products run in float32 (summed in float64 every 64k rows): agreement to float32 precision.
    assert ((stat.moment() - exact).norm() / exact.norm()).item() < 1e-6
    assert ((stat.mean() - k64.mean(0)).norm() / k64.mean(0).norm()).item() < 1e-6
    cov = torch.cov(k64.T, correction=0)
    assert ((stat.covariance() - cov).norm() / cov.norm()).item() < 1e-5
    assert stat.moment().dtype == torch.float64


def test_merging_partials_equals_the_whole():
    k = torch.randn(900, 5, dtype=torch.float64)
    whole, a, b = SecondMoment(5), SecondMoment(5), SecondMoment(5)
    whole.add(k)
    a.add(k[:333])
    b.add(k[333:])
    merged = a.merge(b)
    assert merged.count == whole.count
    assert torch.allclose(merged.moment(), whole.moment(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError):
        a.merge(SecondMoment(4))


def test_key_moment_over_seed_ranges_merges_into_the_whole():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    seen = []
    whole = key_moment(model, "main.6", range(12), batch_size=5,
                       progress=Progress(lambda e: seen.append((e.stage, e.done, e.total))))
    part = key_moment(model, "main.6", range(7), batch_size=5).merge(key_moment(model, "main.6", range(7, 12)))
    assert seen == [("statistics", 5, 12), ("statistics", 10, 12), ("statistics", 12, 12)]
    assert whole.count == 12 * 8 * 8 and whole.dim == 16
    assert torch.allclose(part.moment(), whole.moment(), rtol=1e-5, atol=1e-9)
    keys = nethook.latents_to_keys(model, "main.6", latents(range(12), 16)).key.double()
    flat = keys.permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.allclose(whole.moment(), flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-9)
    assert nethook.hook_count(model) == 0


def test_key_moment_and_value_quantiles_can_be_cancelled_between_batches():
    model = DCGANGenerator.from_state_dict(dcgan_state())
    polls = []

    def stop_on_second() -> bool:
        polls.append(1)
        return len(polls) > 1

    with pytest.raises(Cancelled):
        key_moment(model, "main.6", range(10), batch_size=2, progress=Progress(None, stop_on_second))
    assert len(polls) == 2                     # one batch ran, the second never started
    with pytest.raises(Cancelled):
        value_quantiles(model, "main.6", range(10), batch_size=2, progress=Progress(None, lambda: True))


def test_second_moment_round_trips_through_safetensors_bytes():
    stat = SecondMoment(4)
    stat.add(torch.randn(50, 4))
    data = stat.to_bytes()
    back = load_stat(data)
    assert isinstance(back, SecondMoment) and back.count == 50
    assert torch.equal(back.moment(), stat.moment())
    with pytest.raises(ValueError, match="not a statistic"):
        from safetensors.torch import save

        load_stat(save({"x": torch.zeros(1)}))


def test_quantile_is_exact_while_small():
    rows = torch.randn(300, 3)
    q = Quantile(3, capacity=1024)
    q.add(rows)
    assert torch.allclose(q.quantile(0.5), torch.quantile(rows, 0.5, dim=0), atol=1e-6)
    assert torch.allclose(q.quantile([0.0, 1.0]), torch.stack([rows.min(0).values, rows.max(0).values], 1))


def test_quantile_sketch_is_accurate_on_half_a_million_rows_and_merges():
    g = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.randn(500_000, 2, generator=g), torch.rand(500_000, 2, generator=g) * 10], 1)
    whole = Quantile(4, capacity=4096)
    a, b = Quantile(4, capacity=4096), Quantile(4, capacity=4096)
    for start in range(0, rows.shape[0], 50_000):
        whole.add(rows[start : start + 50_000])
    a.add(rows[:300_000])
    b.add(rows[300_000:])
    merged = a.merge(b)
    sorted_rows = rows.sort(0).values
    for sketch in (whole, merged):
        est = sketch.quantile(0.99)
        # Rank error: where the estimate falls in the exact order, as a fraction of all values.
        ranks = torch.stack([torch.searchsorted(sorted_rows[:, u].contiguous(), est[u:u + 1])[0]
                             for u in range(4)]).double() / rows.shape[0]
        assert (ranks - 0.99).abs().max() < 0.002, ranks
    assert merged.count == whole.count == 500_000
    assert sum(lv.shape[1] for lv in whole.levels) < 4096 * 12   # memory stays bounded


def test_quantile_round_trips_and_value_quantiles_run():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    q = value_quantiles(model, "main.6", range(20), batch_size=8, capacity=256)
    assert q.units == 8 and q.count == 20 * 16 * 16
    back = load_stat(q.to_bytes())
    assert isinstance(back, Quantile)
    assert torch.equal(back.quantile(0.99), q.quantile(0.99))
    values = nethook.latents_to_values(model, "main.6", latents(range(20), 16))
    exact = torch.quantile(values.permute(0, 2, 3, 1).reshape(-1, 8), 0.99, dim=0)
    assert torch.allclose(q.quantile(0.99), exact, atol=0.05 * exact.abs().max().item())
