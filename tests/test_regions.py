"""Regions: masks and boxes at image resolution, resampled to layer grids with soft weights kept."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.regions import Region, bbox, decode_mask, resample


def test_box_alpha_and_area_resampling_keep_soft_weights():
    region = Region(seed=0, box=(2, 0, 6, 4))                 # x0, y0, x1, y1 on an 8×8 image
    alpha = region.alpha(8)
    assert alpha.sum() == 16 and alpha[0, 2] == 1 and alpha[0, 1] == 0
    grid = region.at(4, 8)                                    # 2×2 pixels per cell
    assert grid.tolist()[0] == [0.0, 1.0, 1.0, 0.0]
    half = Region(seed=0, box=(1, 0, 3, 2)).at(4, 8)           # straddles two cells: half weight each
    assert half[0].tolist() == [0.5, 0.5, 0.0, 0.0]


def test_soft_mask_is_averaged_not_thresholded():
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[0, 0] = 255
    mask[0, 1] = 51
    cell = Region(seed=1, mask=mask).at(4, 8)[0, 0].item()
    assert cell == pytest.approx((1.0 + 0.2) / 4)
    assert resample(torch.ones(4, 4), 8).shape == (8, 8)


def test_spec_round_trip_is_exact_and_bbox_is_tight():
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[3:7, 5:9] = 128
    spec = Region(seed=9, mask=mask).to_spec()
    back = Region.from_spec(spec, "copy")
    assert back.seed == 9 and torch.equal(back.mask, mask)
    assert bbox(back.alpha(16)) == (3, 5, 7, 9)
    assert bbox(torch.zeros(4, 4)) is None


@pytest.mark.parametrize("spec,field", [
    ({"seed": 1}, "copy"),
    ({"seed": 1, "box": [0, 0, 9, 4]}, "copy.box"),
    ({"seed": -1, "box": [0, 0, 4, 4]}, "copy.seed"),
    ({"seed": 1, "box": [0, 0, 4, 4], "mask": None, "extra": 1}, "copy"),
])
def test_bad_regions_name_the_field(spec, field):
    with pytest.raises(InvalidArgument) as err:
        Region.from_spec(spec, "copy").validate(8, "copy")
    assert err.value.field == field


def test_malformed_mask_encodings():
    with pytest.raises(InvalidArgument, match="unknown encoding"):
        decode_mask({"encoding": "png", "size": [2, 2], "data": ""}, "m")
    with pytest.raises(InvalidArgument, match="malformed mask"):
        decode_mask({"encoding": "zlib-base64-u8", "size": [2, 2], "data": "!!"}, "m")
