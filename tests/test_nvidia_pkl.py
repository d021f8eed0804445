"""NVIDIA StyleGAN2-ADA network pickles, read as data and converted to the stylegan2 layout.

The pickles are written in NVIDIA's format without NVIDIA's code (``tests/nvidia_pickles.py``).
Two checks of the conversion, from both sides:
- against NVIDIA's math: random tensors under NVIDIA's names, rendered by a reference forward pass
  written from the formulas of ``training/networks.py`` (fused modulated convolution, weight
  gains, lr multiplier, noise, ``conv2d_resample``, ``upfirdn2d``) and by the converted model;
- against our own loader: one of our generators written as a pickle by the inverse mapping,
  converted back, renders what the generator renders.
Hostile pickles must run nothing (a sentinel file stays absent) and be refused naming the name.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import time
import types

import numpy as np
import pytest
import torch

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.stylegan2 import StyleGAN2Generator
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.nvidia_pkl import (FIELD, PersistentObject, convert_network_pickle,
                                                  is_network_pickle, read_network_pickle, to_safetensors)
from rulewright.service.engine.sampling import latents, to_uint8
from rulewright.service.domain.requests import SampleRequest
from tests import nvidia_pickles as nv

CFG = nv.Config(resolution=32, w_dim=32, n_mlp=2, channels=(32, 32, 16, 8), lr_multiplier=0.05)
TOL = 1e-5


def pkl(cfg: nv.Config = CFG, seed: int = 0, protocol: int = 3, **extra) -> tuple[bytes, dict]:
    t = nv.random_tensors(cfg, seed)
    return nv.dumps(nv.network_pickle(nv.generator(t, cfg), **extra), protocol), t


def refused(data: bytes) -> str:
    with pytest.raises(InvalidArgument) as err:
        convert_network_pickle(data)
    assert err.value.field == FIELD
    return err.value.description


def rand_port(size: int = 32, seed: int = 0) -> StyleGAN2Generator:
    """One of our generators with every parameter and buffer random (no zero noise strengths)."""
    torch.manual_seed(seed)
    model = StyleGAN2Generator(size, 32, 2, [32, 32, 16, 8][: size.bit_length() - 2])
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not name.endswith("kernel"):
                t.add_(torch.randn_like(t) * (0.2 if "to_rgb" in name else 0.5))
    return model


# ---- the conversion --------------------------------------------------------------------------

@pytest.mark.parametrize("psi", [1.0, 0.6])
def test_converted_renders_what_nvidia_formulas_render(psi):
    data, t = pkl()
    model = StyleGAN2Generator.from_state_dict(convert_network_pickle(data).state)
    z = latents(range(6), CFG.w_dim)
    ours, theirs = model(z, psi), nv.reference_forward(t, CFG, z, psi)
    assert theirs.abs().max() > 0.5                         # a real image, not a vanishing one
    assert (ours - theirs).abs().max() <= TOL


def test_without_noise_and_with_the_default_lr_multiplier():
    cfg = nv.Config(resolution=16, channels=(32, 16, 8), lr_multiplier=0.01, use_noise=False, conv_clamp=None)
    data, t = pkl(cfg, seed=3)
    model = StyleGAN2Generator.from_state_dict(convert_network_pickle(data).state)
    z = latents(range(4), cfg.w_dim)
    assert (model(z) - nv.reference_forward(t, cfg, z)).abs().max() <= TOL


def test_our_generator_written_as_a_pickle_comes_back():
    port = rand_port()
    t, cfg = nv.from_port(port)
    data = nv.dumps(nv.network_pickle(nv.generator(t, cfg)))
    state = convert_network_pickle(data).state
    expected = port.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(state[k], v, rtol=1e-5, atol=1e-6), k
    loaded = load_generator(to_safetensors(convert_network_pickle(data)))    # the bytes import-pkl writes
    z = latents(range(6), 32)
    for psi in (1.0, 0.5):
        assert (loaded(z, psi) - port(z, psi)).abs().max() <= TOL
        # and the reference agrees with our implementation on the same weights
        assert (nv.reference_forward(t, cfg, z, psi) - port(z, psi)).abs().max() <= TOL


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_every_python3_protocol_reads_the_same(protocol):
    a = convert_network_pickle(pkl(protocol=3)[0]).state
    b = convert_network_pickle(pkl(protocol=protocol)[0]).state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_numpy_1_names_read_too():
    """Pickles written with numpy 1.x (all of NVIDIA's) name numpy.core.multiarray.scalar."""
    data = pkl()[0]
    old = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    assert old != data and b"numpy._core" not in old
    a, b = convert_network_pickle(data).state, convert_network_pickle(old).state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bare_generator_pickle_reads_too():
    t = nv.random_tensors(CFG)
    bare = convert_network_pickle(nv.dumps(nv.generator(t, CFG))).state
    full = convert_network_pickle(pkl()[0]).state
    assert all(torch.equal(bare[k], full[k]) for k in full)


def test_what_was_found_is_reported():
    data, _ = pkl()
    conversion = convert_network_pickle(data)
    s = conversion.source
    assert s["z_dim"] == s["w_dim"] == 32 and s["c_dim"] == 0 and s["img_resolution"] == 32
    assert s["mapping_layers"] == 2 and s["mapping_lr_multiplier"] == 0.05
    assert s["channels"] == {"4": 32, "8": 32, "16": 16, "32": 8} and s["architecture"] == "skip"
    assert s["conv_clamp"] == 256 and s["fp16_blocks"] == [16, 32]
    assert s["init_kwargs"]["synthesis_kwargs"]["channel_base"] == 128
    assert s["init_kwargs"]["mapping_kwargs"]["num_layers"] == 2
    assert to_safetensors(conversion) == to_safetensors(convert_network_pickle(data))   # same input, same bytes


def test_reading_imports_nothing_it_names():
    data, _ = pkl()
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        assert name not in sys.modules
    top = read_network_pickle(data)
    assert isinstance(top["G_ema"], PersistentObject) and top["G_ema"].class_name == "Generator"
    assert top["G_ema"].module_src == nv.SOURCE
    assert top["training_set_kwargs"]["path"] == "faces.zip"
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        assert name not in sys.modules


def test_pickle_magic():
    assert is_network_pickle(b"\x80\x03}q\x00.") and is_network_pickle(b"\x80\x04\x95")
    assert not is_network_pickle(b"\x80\x01") and not is_network_pickle(b"PK\x03\x04")
    assert "not a pickle" in refused(b"{}")


# ---- hostile pickles -------------------------------------------------------------------------

class Call:
    """Pickles as a call of ``fn(*args)``: what a hostile ``__reduce__`` does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _hostile_calls(sentinel: str) -> list:
    return [
        (os.system, (f"touch {sentinel}",)),
        (eval, (f"open({sentinel!r}, 'w').close()",)),
        (exec, (f"open({sentinel!r}, 'w').close()",)),
        (open, (sentinel, "w")),
        (getattr, (Call(__import__, "os"), "system")),
        (collections.Counter, ("abc",)),               # harmless, but not on the list either
        (torch.load, (sentinel,)),
    ]


@pytest.mark.parametrize("where", ["top", "G_ema", "layer attribute"])
@pytest.mark.parametrize("index", range(7))
def test_a_reduce_that_would_run_code_is_refused_by_name(tmp_path, where, index):
    sentinel = tmp_path / "ran"
    fn, args = _hostile_calls(str(sentinel))[index]
    evil = Call(fn, *args)
    t = nv.random_tensors(CFG)
    if where == "top":
        data = nv.dumps(nv.network_pickle(nv.generator(t, CFG), evil=evil))
    elif where == "G_ema":
        data = nv.dumps({"G_ema": evil})
    else:
        g = nv.generator(t, CFG)
        g.state["_modules"]["synthesis"].state["_modules"]["b8"].state["_modules"]["conv0"].state["up"] = evil
        data = nv.dumps(nv.network_pickle(g))
    message = refused(data)
    name = f"{fn.__module__}.{fn.__qualname__}"
    assert name in message and "allow-list" in message, message
    assert not sentinel.exists()


def test_embedded_source_is_never_run(tmp_path):
    sentinel = tmp_path / "ran"
    source = f"open({str(sentinel)!r}, 'w').write('the module source ran')\n"
    t = nv.random_tensors(CFG)
    g = nv.generator(t, CFG)
    stack = [g]
    while stack:                            # every module carries the hostile source
        node = stack.pop()
        node.module_src = source
        stack.extend(node.state["_modules"].values())
    state = convert_network_pickle(nv.dumps(nv.network_pickle(g))).state
    assert not sentinel.exists()
    assert torch.equal(state["input.input"][0], t["synthesis.b4.const"])   # the data is all that was used
    # and a class the source would define is not a class the reader knows
    evil = nv.Persistent("Exploit", {"payload": 1}, module_src=source)
    assert "Exploit" in refused(nv.dumps({"G_ema": evil}))
    assert not sentinel.exists()


def _storage_blob(reference: bytes, header_global: bool = False) -> bytes:
    """torch's legacy serialization of one storage, with a reference pickle of our choosing."""
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    if header_global:
        magic = pickle.dumps(Call(os.system, ("true",)), protocol=2)
    info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    return magic + pickle.dumps(1001, protocol=2) + info + reference + pickle.dumps(["0"], protocol=2) + \
        (1).to_bytes(8, "little") + b"\x00\x00\x80\x3f"


class Storage:
    """Pickles as ``torch.storage._load_from_bytes(blob)``, as a tensor's storage does."""

    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


def test_a_storage_that_would_run_code_is_refused(tmp_path):
    sentinel = tmp_path / "ran"
    reference = pickle.dumps(Call(os.system, (f"touch {sentinel}",)), protocol=2)
    message = refused(nv.dumps({"G_ema": Storage(_storage_blob(reference))}))
    assert "posix.system" in message or "nt.system" in message, message
    assert "posix.system" in refused(nv.dumps({"G_ema": Storage(_storage_blob(b"", header_global=True))}))
    assert not sentinel.exists()


def test_a_tensor_past_its_storage_is_refused():
    data = pickle.dumps(torch.arange(4.0)[1:3], protocol=3)
    top = read_network_pickle(data)
    assert torch.equal(top, torch.tensor([1.0, 2.0]))          # an offset view reads right
    forged = data.replace(b"K\x01K\x02\x85", b"K\x03K\x02\x85")  # offset 3, size 2, in 4 elements
    assert forged != data
    assert "reaches past its storage" in refused(forged)


def _build_on(module: str, name: str, attr: str) -> bytes:
    """A pickle that sets ``attr`` on the object the reader resolves ``module.name`` to (BUILD)."""
    def text(s: str) -> bytes:
        b = s.encode()
        return pickle.BINUNICODE + len(b).to_bytes(4, "little") + b
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.NONE
            + pickle.EMPTY_DICT + text(attr) + pickle.MARK + pickle.NEWTRUE + pickle.TUPLE + pickle.SETITEM
            + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)


@pytest.mark.parametrize("module, name, attr", [
    ("torch._utils", "_rebuild_tensor_v2", "__defaults__"),
    ("dnnlib.util", "EasyDict", "__setitem__"),
    ("numpy", "dtype", "__setstate__"),
    ("collections", "OrderedDict", "__init__"),
])
def test_a_pickle_cannot_change_the_reader_for_the_next_one(module, name, attr):
    try:
        read_network_pickle(_build_on(module, name, attr))
    except InvalidArgument:
        pass                                  # refused, or read into its own throwaway class
    data, t = pkl(cfg=nv.Config(resolution=8, channels=(16, 8)))
    assert torch.equal(convert_network_pickle(data).state["input.input"][0], t["synthesis.b4.const"])


def test_shared_references_do_not_blow_up():
    """A pickle's memo lets one list appear 2**60 times in 60 levels: nothing may walk or print it all."""
    bomb: list = []
    for _ in range(60):
        bomb = [bomb, bomb]
    t = nv.random_tensors(CFG)
    g = nv.generator(t, CFG)
    g.state["_init_kwargs"]["mapping_kwargs"] = bomb
    start = time.monotonic()
    assert convert_network_pickle(nv.dumps(nv.network_pickle(g))).source["init_kwargs"]["mapping_kwargs"]
    g.state["_modules"]["mapping"].state["num_layers"] = bomb
    assert "G_ema.mapping.num_layers is [[[" in refused(nv.dumps(nv.network_pickle(g)))
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("cut", [10, 1000, -1000, -1])
def test_truncated_data_is_refused(cut):
    data, _ = pkl()
    assert "truncated" in refused(data[:cut])


def test_unknown_class_name_and_format_version_are_named():
    assert "Exploit" in refused(nv.dumps({"G_ema": nv.Persistent("Exploit", {})}))
    assert "format version 5" in refused(nv.dumps({"G_ema": nv.Persistent("Generator", {}, version=5)}))
    assert "'function'" in refused(nv.dumps({"G_ema": nv.Persistent("Generator", {}, kind="function")}))
    assert "no G_ema" in refused(nv.dumps({"G": torch.zeros(2)}))
    assert "holds a list" in refused(pickle.dumps([1, 2, 3], protocol=3))


# ---- generators that are not converted -------------------------------------------------------

def test_tensorflow_era_pickles_are_refused_by_name(monkeypatch):
    Network = type("Network", (), {"__module__": "dnnlib.tflib.network", "__qualname__": "Network"})
    with monkeypatch.context() as m:               # the names exist only while pickling
        for name in ("dnnlib", "dnnlib.tflib", "dnnlib.tflib.network"):
            m.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["dnnlib.tflib.network"].Network = Network
        nets = []
        for _ in range(3):
            net = Network()
            net.__dict__.update(version=4, name="G_synthesis", static_kwargs={}, components={}, variables=[])
            nets.append(net)
        data = pickle.dumps(tuple(nets), protocol=3)
    message = refused(data)
    assert "TensorFlow" in message and "dnnlib.tflib.network.Network" in message


@pytest.mark.parametrize("protocol", [4, 5])
def test_stylegan3_is_refused(protocol):
    """StyleGAN3's synthesis: an input layer and layers L0_36_512 …, with sizes in numpy arrays."""
    t = nv.random_tensors(CFG)
    g = nv.generator(t, CFG)
    synthesis = g.state["_modules"]["synthesis"]
    synthesis.state["_modules"] = collections.OrderedDict(
        input=nv.module("SynthesisInput", buffers={"freqs": torch.randn(4, 2), "phases": torch.randn(4),
                                                   "transform": torch.eye(3)},
                        size=np.broadcast_to(np.asarray(36), [2]), sampling_rate=np.float64(16.0)),
        L0_36_512=nv.module("SynthesisLayer", buffers={"magnitude_ema": torch.ones(())}, use_fp16=False,
                            in_size=np.broadcast_to(np.asarray(36), [2]), out_size=np.arange(2) + 36,
                            up_taps=np.array([1.0, 2.0], dtype=np.float32)))
    message = refused(nv.dumps(nv.network_pickle(g), protocol))
    assert "StyleGAN3" in message and "SynthesisInput" in message


def test_numpy_arrays_are_read_as_bytes_only():
    top = read_network_pickle(nv.dumps({"a": np.arange(3, dtype=np.float32), "b": np.broadcast_to(7, [2])}, 5))
    assert top["a"].shape == (3,) and top["a"].code == "f4"
    assert top["a"].raw == np.arange(3, dtype=np.float32).tobytes()
    assert top["b"].shape == (2,) and top["b"].raw == np.array([7, 7]).tobytes()
    assert "'O8' is not a number type" in refused(nv.dumps({"G_ema": np.array([None, "x"], dtype=object)}))


def test_conditional_generators_are_refused():
    t = nv.random_tensors(CFG)
    g = nv.generator(t, CFG)
    g.state["c_dim"] = 10
    assert "c_dim=10" in refused(nv.dumps(nv.network_pickle(g)))


@pytest.mark.parametrize("arch", ["resnet", "orig"])
def test_other_architectures_are_refused(arch):
    cfg = nv.Config(resolution=16, channels=(32, 16, 8), architecture=arch)
    message = refused(pkl(cfg)[0])
    assert f"architecture {arch!r}" in message and "G_ema.synthesis.b4" in message


def test_other_shapes_are_refused_naming_the_tensor():
    cfg = nv.Config(resolution=16, channels=(32, 16, 8))
    t = nv.random_tensors(cfg)
    t["synthesis.b8.conv1.weight"] = torch.randn(16, 16, 5, 5)
    assert "G_ema.synthesis.b8.conv1.weight has shape (16, 16, 5, 5)" in refused(
        nv.dumps(nv.network_pickle(nv.generator(t, cfg))))
    t = nv.random_tensors(cfg)
    t["synthesis.b8.resample_filter"] = torch.ones(4, 4) / 16
    assert "G_ema.synthesis.b8.resample_filter is not the [1, 3, 3, 1] filter" in refused(
        nv.dumps(nv.network_pickle(nv.generator(t, cfg))))
    t = nv.random_tensors(cfg)
    t["synthesis.b16.torgb.bias"] = torch.tensor([float("nan"), 0.0, 0.0])
    assert "G_ema.synthesis.b16.torgb.bias holds NaN" in refused(nv.dumps(nv.network_pickle(nv.generator(t, cfg))))


# ---- the command line ------------------------------------------------------------------------

def test_import_pkl_command(tmp_path, capsys):
    from rulewright.service.cli import main

    data, t = pkl()
    src = tmp_path / "network-snapshot.pkl"
    src.write_bytes(data)
    out = tmp_path / "model.safetensors"
    assert main(["import-pkl", str(src), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    z = latents(range(3), CFG.w_dim)
    assert (load_generator(out)(z) - nv.reference_forward(t, CFG, z)).abs().max() <= TOL

    sentinel = tmp_path / "ran"
    src.write_bytes(nv.dumps({"G_ema": Call(os.system, (f"touch {sentinel}",))}))
    assert main(["import-pkl", str(src), "--out", str(tmp_path / "evil.safetensors")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not sentinel.exists() and not (tmp_path / "evil.safetensors").exists()


def test_domain_import_converts_a_pickle(tmp_path):
    from tests.builders import tiny_domain

    domain = tiny_domain(tmp_path)
    try:
        data, t = pkl()
        version = domain.import_model("mini", arch="stylegan2", config={"size": 32}, data=data,
                                      spec={"source": "network-snapshot.pkl"})
        assert version.spec["source"] == "network-snapshot.pkl"
        assert version.spec["converted_from"]["sha256"] == convert_network_pickle(data).source["sha256"]
        images = domain.sample(SampleRequest("mini", seeds=[0, 1])).images
        z = latents([0, 1], CFG.w_dim)
        expected = nv.reference_forward(t, CFG, z)
        assert (images.int() - to_uint8(expected).int()).abs().max() <= 1       # rounding apart
        with pytest.raises(InvalidArgument) as err:
            domain.import_model("evil", arch="stylegan2", config=None,
                                data=nv.dumps({"G_ema": Call(os.system, ("true",))}))
        assert err.value.field == "weights" and "posix.system" in err.value.description
        with pytest.raises(InvalidArgument) as err:
            domain.import_model("wrong", arch="dcgan", config=None, data=data)
        assert err.value.field == "arch"
    finally:
        domain.close()
