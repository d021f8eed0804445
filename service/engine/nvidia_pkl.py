"""Read NVIDIA's StyleGAN2-ADA network pickles as data and convert their ``G_ema`` to ``stylegan2``.

- ``is_network_pickle(data)``: whether bytes begin like a pickle (protocol 2 to 5).
- ``read_network_pickle(data)``: the pickle's objects, read by a restricted unpickler; every
  persistent object (``torch_utils.persistence``) becomes a ``PersistentObject`` record.
- ``convert_network_pickle(data)``: a ``Conversion``: ``G_ema`` in the ``stylegan2`` layout
  (what ``StyleGAN2Generator.from_state_dict`` reads) and a JSON summary of what was found.
- ``to_safetensors(conversion)``: the converted weights as a safetensors file (same input, same bytes).

Every refusal is an ``InvalidArgument`` on field ``weights`` that names what the reader found.

**Why reading is safe.** NVIDIA's own loader unpickles classes whose Python source travels
inside the pickle and runs that source. This reader never imports or executes anything the
pickle names. ``find_class`` resolves only these names, to the reader's own functions:

- ``torch_utils.persistence._reconstruct_persistent_obj``: records its argument (class name,
  module source, format version, state) as a ``PersistentObject``. The source is kept as text.
- ``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``, ``_rebuild_parameter_with_state``:
  a strided view of a storage this reader decoded, bounds-checked; hooks and metadata refused.
- ``torch.storage._load_from_bytes``: decodes torch's legacy storage serialization (a magic
  number, a header, one storage reference, raw little-endian numbers) with a second restricted
  unpickler that resolves only storage type names (``torch.FloatStorage`` …) to dtypes.
- ``numpy.dtype`` and ``numpy.core.multiarray.scalar`` (also ``numpy._core``): a number type code
  and the scalar's bytes decoded with ``struct`` (object scalars refused).
- ``numpy.ndarray`` with ``numpy.core.multiarray._reconstruct`` and ``numpy.core.numeric._frombuffer``
  (also ``numpy._core``): an array's shape, type code and raw bytes, kept as bytes (object
  arrays refused). StyleGAN3 stores sizes in arrays; reading them lets it be named and refused.
- ``collections.OrderedDict``, ``builtins.set``, ``builtins.frozenset``: containers.
- ``dnnlib.util.EasyDict`` (also ``dnnlib.EasyDict``): a plain ``dict`` subclass.

Each of these only builds containers, numbers, strings or tensors out of the pickle's own bytes,
so a pickle can describe data but never reach code. Classes the reader hands out are created
per read and its functions are bound methods (whose attributes cannot be set), so a pickle that
sets attributes on what it names (BUILD) cannot affect another read. Storages saved on a GPU
read the same (their device is ignored: everything lands on the CPU). Any other name
(``os.system``, ``builtins.eval``, a TensorFlow-era ``dnnlib.tflib.network.Network``) stops the
read before the object that names it is built.

**Conversion.** NVIDIA's layers (``training/networks.py``) and the ``stylegan2`` port compute the
same functions with different stored scales; each tensor is rescaled so that the product the
forward pass uses is NVIDIA's: mapping and affine layers by ``weight_gain / scale`` and
``bias_gain / lr_mul`` (NVIDIA's ``lr_multiplier`` becomes the port's fixed one), modulated
3×3 weights by ``sqrt(fan_in)`` (NVIDIA demodulates the unscaled weight), ToRGB weights by
NVIDIA's ``weight_gain`` over the port's scale. ``noise_const`` becomes the fixed noise maps (the
port always draws NVIDIA's ``noise_mode='const'``), ``w_avg`` becomes ``latent_avg``. Supported:
unconditional StyleGAN2(-ADA) generators of the ``'skip'`` architecture (config F) with 3×3
convolutions, the ``[1, 3, 3, 1]`` filter, leaky ReLU, RGB output and ``z_dim == w_dim``.
Refused with the reason: StyleGAN3, TensorFlow-era pickles, ``c_dim > 0``, ``'orig'`` and
``'resnet'`` architectures, anything else. Not carried over: ``conv_clamp`` (a float16 guard that
clips activations at ±conv_clamp; nothing changes unless an activation reaches it) and the
float16 blocks (the port renders in float32, as NVIDIA's ``force_fp32=True`` does).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import pickle
import reprlib
import struct
import sys
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import check_state_dict
from rulewright.service.engine.generators.stylegan2 import ARCH, BLUR_KERNEL, Blur, StyledConv, StyleGAN2Generator, ToRGB, Upsample, make_kernel

FIELD = "weights"                       # the request field every refusal names
PERSISTENCE_VERSION = 6                 # torch_utils.persistence._version of StyleGAN2-ADA and StyleGAN3
FORMAT = "stylegan2-ada-pytorch network pickle"

# torch.save's legacy (non-zip) format, which pickled storages use inside _load_from_bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
# numpy scalar type codes (as numpy pickles a dtype) → struct format characters.
_NUMPY_FORMATS = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                  "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}
_BYTE_ORDERS = {"<": "<", ">": ">", "|": "<", "=": "="}
_TENSOR_KINDS = ("_parameters", "_buffers")


def _refuse(message: str) -> InvalidArgument:
    return InvalidArgument(FIELD, message)


def is_network_pickle(data: bytes) -> bool:
    """Whether bytes begin like a pickle of protocol 2 to 5 (how every network pickle begins)."""
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


# ---------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(repr=False)
class PersistentObject:
    """One object ``torch_utils.persistence`` saved with its module's source: recorded, never built."""

    class_name: str                     # the class's name in its module
    module_src: str                     # the module's Python source, kept as text and never run
    version: int                        # the persistence format's version
    state: dict                         # the object's __dict__ (an nn.Module's: _parameters, _modules, …)

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


@dataclasses.dataclass(frozen=True)
class _Storage:
    flat: torch.Tensor                  # the storage's elements, 1-d


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int
    view: tuple | None


def _refusal_for(module: str, name: str) -> str:
    qualified = f"{module}.{name}"
    if module.startswith("dnnlib.tflib"):
        return (f"a TensorFlow-era network pickle ({qualified}): only StyleGAN2-ADA PyTorch pickles can be "
                "read; TensorFlow networks are stored as TensorFlow variables, not PyTorch tensors")
    return (f"the pickle refers to {qualified}, which is not on the reader's allow-list "
            "(only tensors, containers, numbers and persistent-object records are read)")


class _NoGlobals(pickle.Unpickler):
    """Numbers, strings and containers only (the headers of a legacy storage)."""

    def find_class(self, module: str, name: str) -> Any:
        raise _refuse(f"a storage header refers to {module}.{name}; headers hold plain values only")

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a storage header holds a persistent id; headers hold plain values only")


class _StorageReference(pickle.Unpickler):
    """The reference pickle of a legacy storage: a storage type name and a persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(f"{module}.{name}", _STORAGE_DTYPES[name])
        raise _refuse(f"a storage refers to {module}.{name}, which is not a storage type")

    def persistent_load(self, pid: Any) -> Any:
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
              and isinstance(pid[2], str) and isinstance(pid[3], str) and _is_int(pid[4]) and pid[4] >= 0)
        view = pid[5] if ok else None
        if ok and view is not None:
            ok = (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) and _is_int(view[1])
                  and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0 and view[1] + view[2] <= pid[4])
        if not ok:
            raise _refuse(f"a storage's persistent id is malformed: {_short(pid)}")
        return _StorageRef(pid[2], pid[1].dtype, pid[4], view)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Bounded in depth and breadth: a pickle's memo can share one list many times over, and a plain
# repr of such a structure grows exponentially.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


def _short(v: Any) -> str:
    try:
        return _REPR.repr(v)
    except Exception:  # noqa: BLE001 -- e.g. an integer too long to print
        return f"<{type(v).__name__}>"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _decode_storage(blob: Any) -> _Storage:
    """One storage from torch's legacy serialization (what ``torch.storage._load_from_bytes`` reads)."""
    if not isinstance(blob, bytes):
        raise _refuse(f"torch.storage._load_from_bytes got a {type(blob).__name__}, not bytes")
    f = io.BytesIO(blob)
    if _NoGlobals(f).load() != _LEGACY_MAGIC or _NoGlobals(f).load() != _LEGACY_PROTOCOL:
        raise _refuse("a storage is not in torch's legacy serialization (wrong magic number or protocol)")
    info = _NoGlobals(f).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise _refuse("a storage was written big-endian or without a header; only little-endian storages are read")
    ref = _StorageReference(f).load()
    if not isinstance(ref, _StorageRef):
        raise _refuse(f"a storage pickle holds a {type(ref).__name__}, not a storage reference")
    keys = _NoGlobals(f).load()
    if keys != [ref.key]:
        raise _refuse(f"a storage pickle lists storages {_short(keys)}, expected exactly [{ref.key!r}]")
    head = f.read(8)
    if len(head) != 8:
        raise _refuse("a storage ends before its element count (truncated)")
    count = int.from_bytes(head, "little")
    if count != ref.numel:
        raise _refuse(f"a storage holds {count} elements, its reference says {ref.numel}")
    nbytes = count * _element_size(ref.dtype)
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise _refuse(f"a storage ends after {len(raw)} of its {nbytes} bytes (truncated)")
    if sys.byteorder != "little":
        raise _refuse("storages are little-endian and this host is not; convert the pickle on a little-endian one")
    flat = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
    if ref.view is not None:
        flat = flat[ref.view[1]:ref.view[1] + ref.view[2]]
    return _Storage(flat)


class _Reader(pickle.Unpickler):
    """The restricted unpickler: the allow-list of the module docstring, resolved to our own code."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        # Fresh classes per read and bound methods (whose attributes cannot be set): a pickle
        # can set attributes on what it names (BUILD), and that must not reach the next read.
        easydict = type("EasyDict", (dict,), {"__module__": __name__, "__doc__": "dnnlib.EasyDict, as a dict"})
        self._dtype = _numpy_dtype_class()
        self._ndarray = _numpy_array_class(self._dtype)
        self._globals: dict[tuple[str, str], Any] = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): self._reconstruct,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): self._load_storage,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("dnnlib.util", "EasyDict"): easydict,
            ("dnnlib", "EasyDict"): easydict,
            ("numpy", "dtype"): self._dtype,
            ("numpy.core.multiarray", "scalar"): self._numpy_scalar,
            ("numpy._core.multiarray", "scalar"): self._numpy_scalar,
            # numpy arrays (StyleGAN3 keeps sizes in them): read so that the generator can be
            # named for what it is, never used in the conversion.
            ("numpy", "ndarray"): self._ndarray,
            ("numpy.core.multiarray", "_reconstruct"): self._numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._numpy_reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self._numpy_frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self._numpy_frombuffer,
        }

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise _refuse(_refusal_for(module, name))
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse(f"the pickle holds a persistent id ({_short(pid)}); network pickles have none")

    def _reconstruct(self, meta: Any = None, *extra: Any) -> PersistentObject:
        if extra or not isinstance(meta, dict):
            raise _refuse("torch_utils.persistence._reconstruct_persistent_obj got something other than one meta dict")
        missing = sorted({"type", "version", "module_src", "class_name", "state"} - set(meta))
        if missing:
            raise _refuse(f"a persistent object's meta dict lacks {', '.join(missing)}")
        if meta["type"] != "class":
            raise _refuse(f"a persistent object has type {_short(meta['type'])}; only 'class' objects are read")
        if meta["version"] != PERSISTENCE_VERSION:
            raise _refuse(f"a persistent object has format version {_short(meta['version'])}; "
                          f"this reader knows version {PERSISTENCE_VERSION}")
        if not isinstance(meta["class_name"], str) or not isinstance(meta["module_src"], str):
            raise _refuse("a persistent object's class_name and module_src must be strings")
        if not isinstance(meta["state"], dict):
            raise _refuse(f"persistent object {meta['class_name']} has a {type(meta['state']).__name__} "
                          "for a state, not a dict")
        return PersistentObject(meta["class_name"], meta["module_src"], meta["version"], dict(meta["state"]))

    def _rebuild_tensor(self, storage: Any = None, offset: Any = None, size: Any = None, stride: Any = None,
                        requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, _Storage):
            raise _refuse(f"torch._utils._rebuild_tensor_v2 got a {type(storage).__name__}, not a storage")
        ok = (_is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
              and len(size) == len(stride) and all(_is_int(s) and s >= 0 for s in size + stride))
        if not ok:
            raise _refuse(f"a tensor has a malformed offset, size or stride: {_short((offset, size, stride))}")
        if backward_hooks or metadata:
            raise _refuse("a tensor carries backward hooks or metadata; network weights have neither")
        numel = storage.flat.numel()
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if math.prod(size) else offset - 1
        if last >= numel or offset > numel:
            raise _refuse(f"a tensor of size {size} at offset {offset} reaches past its storage of {numel} elements")
        return torch.as_strided(storage.flat, size, stride, offset)

    def _rebuild_parameter(self, data: Any = None, requires_grad: Any = False, backward_hooks: Any = None,
                           state: Any = None) -> torch.Tensor:
        if type(data) is not torch.Tensor:
            raise _refuse(f"torch._utils._rebuild_parameter got a {type(data).__name__}, not a tensor")
        if backward_hooks:
            raise _refuse("a parameter carries backward hooks; network weights have none")
        return data

    def _load_storage(self, blob: Any = None) -> _Storage:
        return _decode_storage(blob)

    def _numpy_reconstruct(self, subtype: Any = None, shape: Any = None, code: Any = None) -> Any:
        if subtype is not self._ndarray:
            raise _refuse(f"numpy.core.multiarray._reconstruct of {_short(subtype)}; only numpy.ndarray is read")
        return self._ndarray()

    def _numpy_frombuffer(self, buf: Any = None, dtype: Any = None, shape: Any = None, order: Any = "C") -> Any:
        if order not in ("C", "F"):
            raise _refuse(f"a numpy array has memory order {_short(order)}")
        return self._ndarray().set(shape, dtype, buf)

    def _numpy_scalar(self, dtype: Any = None, data: Any = None) -> int | float | bool:
        if not isinstance(dtype, self._dtype) or not isinstance(data, bytes):
            raise _refuse(f"numpy scalar of {_short(dtype)} is not a number stored as bytes")
        try:
            return struct.unpack(_BYTE_ORDERS[dtype.byteorder] + _NUMPY_FORMATS[dtype.code], data)[0]
        except struct.error:
            raise _refuse(f"numpy scalar of type {dtype.code} has {len(data)} bytes") from None


def _numpy_array_class(dtype_class: type) -> type:
    class NumpyArray:
        """numpy.ndarray, as data: its shape, number type code and raw bytes, checked for size."""

        shape: tuple | None = None
        code: str | None = None
        raw: bytes = b""

        def set(self, shape: Any, dtype: Any, raw: Any) -> "NumpyArray":
            if not (isinstance(shape, tuple) and all(_is_int(n) and n >= 0 for n in shape)):
                raise _refuse(f"a numpy array has a malformed shape {_short(shape)}")
            if not isinstance(dtype, dtype_class):
                raise _refuse(f"a numpy array holds {_short(dtype)}, not numbers (object arrays are not read)")
            size = math.prod(shape) * struct.calcsize(_NUMPY_FORMATS[dtype.code])
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != size:
                raise _refuse(f"a numpy array of shape {shape} and type {dtype.code} does not hold {size} bytes")
            self.shape, self.code, self.raw = shape, dtype.code, bytes(raw)
            return self

        def __setstate__(self, state: Any) -> None:
            if not (isinstance(state, tuple) and len(state) == 5):
                raise _refuse(f"a numpy array has a malformed state {_short(state)}")
            self.set(state[1], state[2], state[4])

    return NumpyArray


def _numpy_dtype_class() -> type:
    class NumpyDType:
        """numpy.dtype, as far as a pickled number needs it: its type code and byte order."""

        def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
            if code not in _NUMPY_FORMATS:
                raise _refuse(f"numpy.dtype {_short(code)} is not a number type (only bool, int, uint, float)")
            self.code = code
            self.byteorder = "="

        def __setstate__(self, state: Any) -> None:
            if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in _BYTE_ORDERS):
                raise _refuse(f"numpy.dtype {self.code} has a malformed state {_short(state)}")
            self.byteorder = state[1]

    return NumpyDType


def read_network_pickle(data: bytes) -> Any:
    """The pickle's top-level object, read as data (see the module docstring for what is resolved)."""
    if not is_network_pickle(data):
        raise _refuse("not a pickle (a network pickle begins with the PROTO opcode, protocol 2 to 5)")
    try:
        return _Reader(data).load()
    except InvalidArgument:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in text or "Ran out" in text:
            raise _refuse(f"the pickle ends early (truncated): {text}") from None
        raise _refuse(f"malformed pickle: {text}") from None
    except Exception as exc:  # noqa: BLE001 -- any other failure of a hostile stream is bad input
        raise _refuse(f"malformed pickle ({type(exc).__name__}: {_short(str(exc))})") from None


# ---------------------------------------------------------------------------------------------
# The generator's tree


class _Node:
    """A ``PersistentObject`` that should be an ``nn.Module``, with its path for messages."""

    def __init__(self, obj: Any, path: str):
        if not isinstance(obj, PersistentObject):
            raise _refuse(f"{path} is a {type(obj).__name__}, not a persistent network module")
        self.obj = obj
        self.path = path

    @property
    def cls(self) -> str:
        return self.obj.class_name

    def expect(self, class_name: str) -> "_Node":
        if self.cls != class_name:
            raise _refuse(f"{self.path} is a {self.cls}, expected a StyleGAN2-ADA {class_name}")
        return self

    def has(self, name: str) -> bool:
        return name in self.obj.state

    def attr(self, name: str, *kinds: type) -> Any:
        if name not in self.obj.state:
            raise _refuse(f"{self.path} ({self.cls}) has no attribute {name!r}")
        value = self.obj.state[name]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise _refuse(f"{self.path}.{name} is {_short(value)}, expected {' or '.join(k.__name__ for k in kinds)}")
        return value

    def number(self, name: str) -> float:
        try:
            value = float(self.attr(name, int, float))
        except OverflowError:
            value = math.inf
        if not math.isfinite(value) or value <= 0:
            raise _refuse(f"{self.path}.{name} is {value}, expected a positive number")
        return value

    def _dict(self, key: str) -> dict:
        value = self.obj.state.get(key, {})
        if not isinstance(value, dict):
            raise _refuse(f"{self.path}.{key} is a {type(value).__name__}, not a dict")
        return value

    def children(self) -> dict[str, "_Node"]:
        return {str(k): _Node(v, f"{self.path}.{k}") for k, v in self._dict("_modules").items() if v is not None}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind in _TENSOR_KINDS:
            for k, v in self._dict(kind).items():
                if v is None:
                    continue
                if type(v) is not torch.Tensor:
                    raise _refuse(f"{self.path}.{k} is a {type(v).__name__}, not a tensor")
                out[str(k)] = v
        return out

    def child(self, name: str, class_name: str) -> "_Node":
        found = self.children()
        if name not in found:
            raise _refuse(f"{self.path} ({self.cls}) has no submodule {name!r}")
        return found[name].expect(class_name)

    def only(self, children: set[str], tensors: set[str]) -> None:
        """Refuse submodules and tensors outside the given names (what StyleGAN2-ADA's class has)."""
        extra = sorted(set(self.children()) - children) + sorted(set(self.tensors()) - tensors)
        if extra:
            found = ", ".join(f"{self.path}.{n}" for n in extra)
            raise _refuse(f"{found}: not part of a StyleGAN2-ADA {self.cls} of the supported kind")

    def shape(self, name: str, ndim: int) -> tuple[int, ...]:
        """The shape of tensor ``name``, which must have ``ndim`` dimensions (sizes are read from it)."""
        t = self.tensors().get(name)
        if t is None or t.ndim != ndim:
            found = "missing" if t is None else f"of shape {tuple(t.shape)}"
            raise _refuse(f"{self.path}.{name} is {found}, expected {ndim} dimensions")
        return tuple(int(s) for s in t.shape)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensors = self.tensors()
        if name not in tensors:
            raise _refuse(f"{self.path} ({self.cls}) has no tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise _refuse(f"{self.path}.{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise _refuse(f"{self.path}.{name} holds {t.dtype}, not floating-point numbers")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise _refuse(f"{self.path}.{name} holds NaN or infinite values")
        return t


def _walk(root: _Node) -> list[_Node]:
    """Every module under ``root``, depth first; a cycle (a module inside itself) is refused."""
    seen: set[int] = set()
    out: list[_Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node.obj) in seen:
            raise _refuse(f"{node.path} appears twice in the module tree")
        seen.add(id(node.obj))
        out.append(node)
        stack.extend(reversed(list(node.children().values())))
    return out


def _refuse_other_generators(g: _Node) -> None:
    """Name the first sign of a generator this converter does not render (StyleGAN3 above all)."""
    for node in _walk(g):
        tensors = node.tensors()
        if node.cls == "SynthesisInput" or "magnitude_ema" in tensors or (
                node.cls == "SynthesisLayer" and node.has("use_fp16")):
            sign = ("is a SynthesisInput" if node.cls == "SynthesisInput" else
                    "has a magnitude_ema buffer" if "magnitude_ema" in tensors else "has use_fp16 per layer")
            raise _refuse(f"a StyleGAN3 (alias-free) generator: {node.path} {sign}; rulewright's stylegan2 "
                          "renders StyleGAN2 generators only")


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A network pickle's ``G_ema`` in the ``stylegan2`` layout, and what was found in the pickle."""

    state: dict[str, torch.Tensor]      # float32, contiguous; ``latent_avg`` from ``w_avg`` when present
    source: dict                        # JSON: format, sha256, NVIDIA's constructor arguments, sizes


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    # Skip the multiplication when the conventions agree, so those tensors stay bit for bit.
    return t.clone().contiguous() if factor == 1.0 else (t * factor).contiguous()


def _json(value: Any, budget: list[int] | None = None, depth: int = 0) -> Any:
    """Constructor arguments as JSON (other objects by their type's name), at most a few hundred
    values: they are recorded beside an import, and a pickle's memo can repeat one list endlessly."""
    budget = [500] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > 6:
        return "…"
    if isinstance(value, dict):
        return {_short(k) if not isinstance(k, str) else k[:200]: _json(v, budget, depth + 1)
                for k, v in list(value.items())[:100]}
    if isinstance(value, (list, tuple)):
        return [_json(v, budget, depth + 1) for v in value[:100]]
    if value is None or isinstance(value, bool) or isinstance(value, int) and abs(value) < 2**63:
        return value
    if isinstance(value, str):
        return value[:1000]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return f"<{type(value).__name__}>"


def _linear(fc: _Node, target, prefix: str, activation: str, shape: tuple[int, int], out: dict) -> None:
    """NVIDIA's FullyConnectedLayer onto the port's EqualLinear (``target``, for its scales)."""
    fc.expect("FullyConnectedLayer")
    fc.only(set(), {"weight", "bias"})
    found = fc.attr("activation", str)
    if found != activation:
        raise _refuse(f"{fc.path} has activation {found!r}; the port's layer here uses {activation!r}")
    weight_gain, bias_gain = fc.number("weight_gain"), fc.number("bias_gain")
    # NVIDIA: x @ (W · weight_gain)ᵀ + b · bias_gain; the port: x @ (W' · scale)ᵀ + b' · lr_mul.
    out[f"{prefix}.weight"] = _scaled(fc.tensor("weight", shape), weight_gain / target.scale)
    out[f"{prefix}.bias"] = _scaled(fc.tensor("bias", shape[:1]), bias_gain / target.lr_mul)


def _check_filter(node: _Node, name: str) -> None:
    found = node.tensor(name, (len(BLUR_KERNEL), len(BLUR_KERNEL)))
    if not torch.allclose(found, make_kernel(BLUR_KERNEL), rtol=0, atol=1e-6):
        raise _refuse(f"{node.path}.{name} is not the [1, 3, 3, 1] filter, the only one the port has")


def _styled(layer: _Node, target: StyledConv, prefix: str, noise_key: str, res: int, up: int,
            w_dim: int, out: dict, clamps: set) -> None:
    """A SynthesisLayer onto the port's StyledConv."""
    layer.expect("SynthesisLayer")
    layer.only({"affine"}, {"weight", "bias", "resample_filter", "noise_const", "noise_strength"})
    conv = target.conv
    if layer.attr("up", int) != up:
        raise _refuse(f"{layer.path} upsamples by {layer.attr('up', int)}, expected {up}")
    if layer.attr("activation", str) != "lrelu":
        raise _refuse(f"{layer.path} has activation {layer.attr('activation', str)!r}; the port uses 'lrelu'")
    if abs(layer.number("act_gain") - math.sqrt(2)) > 1e-6:
        raise _refuse(f"{layer.path}.act_gain is {layer.number('act_gain')}; the port's leaky ReLU has gain sqrt(2)")
    weight = layer.tensor("weight", (conv.out_channels, conv.in_channels, conv.kernel_size, conv.kernel_size))
    _check_filter(layer, "resample_filter")
    clamps.add(layer.attr("conv_clamp", int, float, type(None)) if layer.has("conv_clamp") else None)
    # NVIDIA demodulates the unscaled weight, the port the weight times `scale`: dividing by
    # `scale` makes the two identical, the 1e-8 inside the square root included.
    out[f"{prefix}.conv.weight"] = _scaled(weight, 1.0 / conv.scale)[None]
    _linear(layer.child("affine", "FullyConnectedLayer"), conv.modulation, f"{prefix}.conv.modulation",
            "linear", (conv.in_channels, w_dim), out)
    if layer.attr("use_noise", bool):
        out[f"{prefix}.noise.weight"] = layer.tensor("noise_strength", ()).reshape(1).clone()
        out[noise_key] = layer.tensor("noise_const", (res, res)).reshape(1, 1, res, res).clone()
    else:
        layer.only({"affine"}, {"weight", "bias", "resample_filter"})
        out[f"{prefix}.noise.weight"] = torch.zeros(1)
        out[noise_key] = torch.zeros(1, 1, res, res)
    out[f"{prefix}.activate.bias"] = layer.tensor("bias", (conv.out_channels,)).clone()
    if conv.upsample:
        out[f"{prefix}.conv.blur.kernel"] = Blur(BLUR_KERNEL, (0, 0), upsample_factor=2).kernel


def _to_rgb(torgb: _Node, target: ToRGB, prefix: str, w_dim: int, out: dict, clamps: set) -> None:
    """A ToRGBLayer onto the port's ToRGB."""
    torgb.expect("ToRGBLayer")
    torgb.only({"affine"}, {"weight", "bias"})
    conv = target.conv
    weight = torgb.tensor("weight", (3, conv.in_channels, 1, 1))
    clamps.add(torgb.attr("conv_clamp", int, float, type(None)) if torgb.has("conv_clamp") else None)
    # NVIDIA scales the styles by weight_gain, the port the weight by `scale`: the same product.
    out[f"{prefix}.conv.weight"] = _scaled(weight, torgb.number("weight_gain") / conv.scale)[None]
    _linear(torgb.child("affine", "FullyConnectedLayer"), conv.modulation, f"{prefix}.conv.modulation",
            "linear", (conv.in_channels, w_dim), out)
    out[f"{prefix}.bias"] = torgb.tensor("bias", (3,)).reshape(1, 3, 1, 1).clone()
    if target.upsample is not None:
        out[f"{prefix}.upsample.kernel"] = Upsample(BLUR_KERNEL).kernel


def _generator(top: Any) -> _Node:
    if isinstance(top, PersistentObject):
        return _Node(top, "G")
    if isinstance(top, dict):
        if "G_ema" in top:
            return _Node(top["G_ema"], "G_ema")
        found = ", ".join(sorted(k if isinstance(k, str) else _short(k) for k in top)[:10]) or "nothing"
        raise _refuse(f"the pickle holds {found} but no G_ema (the generator with averaged weights)")
    raise _refuse(f"the pickle holds a {type(top).__name__}, not a network dict with G_ema")


def convert_network_pickle(data: bytes) -> Conversion:
    """Read a StyleGAN2-ADA network pickle as data and convert its ``G_ema`` (see the module docstring)."""
    try:
        return _convert(data)
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 -- whatever else a crafted pickle provokes is still bad input
        raise _refuse(f"cannot convert the network ({type(exc).__name__}: {_short(str(exc))})") from None


def _convert(data: bytes) -> Conversion:
    g = _generator(read_network_pickle(data))
    g.expect("Generator")
    _refuse_other_generators(g)
    z_dim, c_dim, w_dim = g.attr("z_dim", int), g.attr("c_dim", int), g.attr("w_dim", int)
    res, img_channels = g.attr("img_resolution", int), g.attr("img_channels", int)
    if c_dim != 0:
        raise _refuse(f"a conditional generator (c_dim={c_dim}): rulewright's stylegan2 draws from latents "
                      "alone and has no class labels")
    if img_channels != 3:
        raise _refuse(f"{g.path} draws {img_channels}-channel images; the port draws RGB (3)")
    if z_dim != w_dim or w_dim < 1:
        raise _refuse(f"z_dim {z_dim} and w_dim {w_dim} differ; the port's latents and styles share one size")
    log_res = int(math.log2(res)) if res >= 4 else 0
    if 2**log_res != res:
        raise _refuse(f"img_resolution {res} is not a power of two >= 4")
    g.only({"mapping", "synthesis"}, set())
    mapping = g.child("mapping", "MappingNetwork")
    synthesis = g.child("synthesis", "SynthesisNetwork")

    n_mlp = mapping.attr("num_layers", int)
    if n_mlp < 0:
        raise _refuse(f"{mapping.path}.num_layers is {n_mlp}")
    mapping.only({f"fc{i}" for i in range(n_mlp)}, {"w_avg"})
    resolutions = [2**i for i in range(2, log_res + 1)]
    synthesis.only({f"b{r}" for r in resolutions}, set())
    blocks = {r: synthesis.child(f"b{r}", "SynthesisBlock") for r in resolutions}
    for r, block in blocks.items():
        arch = block.attr("architecture", str)
        if arch != "skip":
            why = {"resnet": "residual blocks with 1x1 skip convolutions",
                   "orig": "only the last block draws RGB"}.get(arch, "an unknown architecture")
            raise _refuse(f"{block.path} has architecture {arch!r} ({why}); rulewright's stylegan2 is the 'skip' "
                          "generator (config F)")
        block.only({"conv1", "torgb"} if r == 4 else {"conv0", "conv1", "torgb"},
                   {"const", "resample_filter"} if r == 4 else {"resample_filter"})
        _check_filter(block, "resample_filter")
    channels = [blocks[4].shape("const", 3)[0]]
    channels += [blocks[r].child("conv0", "SynthesisLayer").shape("weight", 4)[0] for r in resolutions[1:]]
    kernel = blocks[4].child("conv1", "SynthesisLayer").shape("weight", 4)[-1]
    if kernel != 3:
        raise _refuse(f"{blocks[4].path}.conv1 has {kernel}x{kernel} kernels; only StyleGAN2's 3x3 are converted")
    if min(channels) < 1:
        raise _refuse(f"{synthesis.path} has a block without channels: {channels}")

    # The port's own layers, for the scales its forward pass applies (read, never duplicated here).
    port = StyleGAN2Generator(res, w_dim, n_mlp, channels, kernel)
    out: dict[str, torch.Tensor] = {}
    clamps: set = set()
    for i in range(n_mlp):
        _linear(mapping.child(f"fc{i}", "FullyConnectedLayer"), port.style[i + 1], f"style.{i + 1}", "lrelu",
                (w_dim, w_dim), out)
    if "w_avg" in mapping.tensors():
        out["latent_avg"] = mapping.tensor("w_avg", (w_dim,)).clone()
    out["input.input"] = blocks[4].tensor("const", (channels[0], 4, 4))[None].clone()
    _styled(blocks[4].child("conv1", "SynthesisLayer"), port.conv1, "conv1", "noises.noise_0", 4, 1, w_dim, out,
            clamps)
    _to_rgb(blocks[4].child("torgb", "ToRGBLayer"), port.to_rgb1, "to_rgb1", w_dim, out, clamps)
    for j, r in enumerate(resolutions[1:]):
        b = blocks[r]
        _styled(b.child("conv0", "SynthesisLayer"), port.convs[2 * j], f"convs.{2 * j}",
                f"noises.noise_{2 * j + 1}", r, 2, w_dim, out, clamps)
        _styled(b.child("conv1", "SynthesisLayer"), port.convs[2 * j + 1], f"convs.{2 * j + 1}",
                f"noises.noise_{2 * j + 2}", r, 1, w_dim, out, clamps)
        _to_rgb(b.child("torgb", "ToRGBLayer"), port.to_rgbs[j], f"to_rgbs.{j}", w_dim, out, clamps)

    expected = StyleGAN2Generator.expected_shapes(res, w_dim, n_mlp, channels, kernel)
    if "latent_avg" in out:
        expected["latent_avg"] = (w_dim,)
    check_state_dict(ARCH, expected, out)      # a converter bug, not bad input, if this ever fails

    fc0 = mapping.children().get("fc0")
    clamp_values = sorted({float(c) for c in clamps if c is not None})
    source = {
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "network": g.path,
        "z_dim": z_dim, "w_dim": w_dim, "c_dim": c_dim, "img_resolution": res, "img_channels": img_channels,
        "mapping_layers": n_mlp,
        "mapping_lr_multiplier": fc0.number("bias_gain") if fc0 is not None else None,
        "channels": {str(r): c for r, c in zip(resolutions, channels)},
        "architecture": "skip",
        "fp16_blocks": [r for r, b in blocks.items() if b.has("use_fp16") and b.attr("use_fp16", bool)],
        "conv_clamp": clamp_values[0] if len(clamp_values) == 1 else (clamp_values or None),
        "init_args": _json(g.obj.state.get("_init_args", [])),
        "init_kwargs": _json(g.obj.state.get("_init_kwargs", {})),
    }
    return Conversion(out, source)


def to_safetensors(conversion: Conversion) -> bytes:
    """The converted weights as safetensors: keys sorted, one sorted-JSON metadata entry (same input, same bytes)."""
    meta = {"arch": ARCH, "source": conversion.source}
    tensors = {k: conversion.state[k].contiguous() for k in sorted(conversion.state)}
    return save_safetensors(tensors, metadata={"rulewright": json.dumps(meta, sort_keys=True)})

