"""Checkpoints load from safetensors and weights-only torch files; pickled code never runs."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from rulewright.service.engine.generators.base import StateDictMismatch
from rulewright.service.engine.loading import CheckpointError, detect_architecture, load_generator, read_state_dict
from tests.builders import dcgan_state, progan_state


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_safetensors_and_torch_give_the_same_generator(tmp_path):
    state = dcgan_state()
    st = tmp_path / "g.safetensors"
    st.write_bytes(st_save({k: v.contiguous() for k, v in state.items()}))
    pt = tmp_path / "g.pt"
    pt.write_bytes(_torch_bytes({"netG_state_dict": state, "epoch": torch.tensor(3)}))
    a, b = load_generator(st), load_generator(str(pt))
    z = torch.randn(2, a.z_dim)
    with torch.no_grad():
        assert torch.equal(a(z), b(z))
    assert a.arch == b.arch == "dcgan"


def test_detects_each_architecture():
    assert detect_architecture(dcgan_state()) == "dcgan"
    assert detect_architecture(progan_state()) == "progan"
    assert detect_architecture({"style.1.weight": torch.zeros(1), "input.input": torch.zeros(1)}) == "stylegan2"
    with pytest.raises(StateDictMismatch, match="no known layout"):
        detect_architecture({"foo.weight": torch.zeros(1)})


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle ran code')",))


def test_pickled_code_is_refused_not_run():
    data = _torch_bytes({"main.0.weight": torch.zeros(2), "evil": _Boom()})
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(data)


def test_garbage_is_refused():
    with pytest.raises(CheckpointError, match="neither|not a safetensors"):
        read_state_dict(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict(_torch_bytes({"main.0.weight": torch.zeros(1), "note": "text"}))


def test_unknown_architecture_name_is_lookup_error():
    with pytest.raises(LookupError, match="unknown architecture"):
        load_generator(dcgan_state(), arch="biggan")


def test_raw_pickle_is_refused():
    # Only safetensors and torch checkpoints are read; a bare pickle is refused before unpickling.
    data = pickle.dumps({"x": 1})
    with pytest.raises(CheckpointError):
        read_state_dict(data)
