"""Read NVIDIA's network pickles as data: a restricted unpickler that never runs the pickle's code.

- ``is_network_pickle(data)``: whether bytes begin like a pickle (protocol 2 to 5).
- ``read_network_pickle(data)``: the pickle's objects; every persistent object
  (``torch_utils.persistence``) becomes a ``PersistentObject`` record.
- ``refuse(message)``: the ``InvalidArgument`` on field ``weights`` every refusal is.

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
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import reprlib
import struct
import sys
from typing import Any

import torch

from rulewright.service.engine.errors import InvalidArgument

FIELD = "weights"                       # the request field every refusal names
PERSISTENCE_VERSION = 6                 # torch_utils.persistence._version of StyleGAN2-ADA and StyleGAN3


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


def refuse(message: str) -> InvalidArgument:
    """The refusal of a network pickle: an ``InvalidArgument`` on field ``weights``."""
    return InvalidArgument(FIELD, message)


def is_network_pickle(data: bytes) -> bool:
    """Whether bytes begin like a pickle of protocol 2 to 5 (how every network pickle begins)."""
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5



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
        raise refuse(f"a storage header refers to {module}.{name}; headers hold plain values only")

    def persistent_load(self, pid: Any) -> Any:
        raise refuse("a storage header holds a persistent id; headers hold plain values only")


class _StorageReference(pickle.Unpickler):
    """The reference pickle of a legacy storage: a storage type name and a persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(f"{module}.{name}", _STORAGE_DTYPES[name])
        raise refuse(f"a storage refers to {module}.{name}, which is not a storage type")

    def persistent_load(self, pid: Any) -> Any:
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
              and isinstance(pid[2], str) and isinstance(pid[3], str) and _is_int(pid[4]) and pid[4] >= 0)
        view = pid[5] if ok else None
        if ok and view is not None:
            ok = (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) and _is_int(view[1])
                  and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0 and view[1] + view[2] <= pid[4])
        if not ok:
            raise refuse(f"a storage's persistent id is malformed: {short_repr(pid)}")
        return _StorageRef(pid[2], pid[1].dtype, pid[4], view)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Bounded in depth and breadth: a pickle's memo can share one list many times over, and a plain
# repr of such a structure grows exponentially.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


def short_repr(v: Any) -> str:
    """``v`` for a message: a repr bounded in depth and length."""
    try:
        return _REPR.repr(v)
    except Exception:  # noqa: BLE001 -- e.g. an integer too long to print
        return f"<{type(v).__name__}>"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _decode_storage(blob: Any) -> _Storage:
    """One storage from torch's legacy serialization (what ``torch.storage._load_from_bytes`` reads)."""
    if not isinstance(blob, bytes):
        raise refuse(f"torch.storage._load_from_bytes got a {type(blob).__name__}, not bytes")
    f = io.BytesIO(blob)
    if _NoGlobals(f).load() != _LEGACY_MAGIC or _NoGlobals(f).load() != _LEGACY_PROTOCOL:
        raise refuse("a storage is not in torch's legacy serialization (wrong magic number or protocol)")
    info = _NoGlobals(f).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise refuse("a storage was written big-endian or without a header; only little-endian storages are read")
    ref = _StorageReference(f).load()
    if not isinstance(ref, _StorageRef):
        raise refuse(f"a storage pickle holds a {type(ref).__name__}, not a storage reference")
    keys = _NoGlobals(f).load()
    if keys != [ref.key]:
        raise refuse(f"a storage pickle lists storages {short_repr(keys)}, expected exactly [{ref.key!r}]")
    head = f.read(8)
    if len(head) != 8:
        raise refuse("a storage ends before its element count (truncated)")
    count = int.from_bytes(head, "little")
    if count != ref.numel:
        raise refuse(f"a storage holds {count} elements, its reference says {ref.numel}")
    nbytes = count * _element_size(ref.dtype)
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise refuse(f"a storage ends after {len(raw)} of its {nbytes} bytes (truncated)")
    if sys.byteorder != "little":
        raise refuse("storages are little-endian and this host is not; convert the pickle on a little-endian one")
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
            # numpy arrays (StyleGAN3 keeps sizes in them): read so that the generator can be
            # named for what it is, never used in the conversion.
            ("numpy", "ndarray"): self._ndarray,
        }
        for core in ("numpy.core", "numpy._core"):          # numpy 1 and numpy 2 spell them so
            self._globals[(f"{core}.multiarray", "scalar")] = self._numpy_scalar
            self._globals[(f"{core}.multiarray", "_reconstruct")] = self._numpy_reconstruct
            self._globals[(f"{core}.numeric", "_frombuffer")] = self._numpy_frombuffer

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise refuse(_refusal_for(module, name))
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise refuse(f"the pickle holds a persistent id ({short_repr(pid)}); network pickles have none")

    def _reconstruct(self, meta: Any = None, *extra: Any) -> PersistentObject:
        if extra or not isinstance(meta, dict):
            raise refuse("torch_utils.persistence._reconstruct_persistent_obj got something other than one meta dict")
        missing = sorted({"type", "version", "module_src", "class_name", "state"} - set(meta))
        if missing:
            raise refuse(f"a persistent object's meta dict lacks {', '.join(missing)}")
        if meta["type"] != "class":
            raise refuse(f"a persistent object has type {short_repr(meta['type'])}; only 'class' objects are read")
        if meta["version"] != PERSISTENCE_VERSION:
            raise refuse(f"a persistent object has format version {short_repr(meta['version'])}; "
                          f"this reader knows version {PERSISTENCE_VERSION}")
        if not isinstance(meta["class_name"], str) or not isinstance(meta["module_src"], str):
            raise refuse("a persistent object's class_name and module_src must be strings")
        if not isinstance(meta["state"], dict):
            raise refuse(f"persistent object {meta['class_name']} has a {type(meta['state']).__name__} "
                          "for a state, not a dict")
        return PersistentObject(meta["class_name"], meta["module_src"], meta["version"], dict(meta["state"]))

    def _rebuild_tensor(self, storage: Any = None, offset: Any = None, size: Any = None, stride: Any = None,
                        requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, _Storage):
            raise refuse(f"torch._utils._rebuild_tensor_v2 got a {type(storage).__name__}, not a storage")
        ok = (_is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
              and len(size) == len(stride) and all(_is_int(s) and s >= 0 for s in size + stride))
        if not ok:
            raise refuse(f"a tensor has a malformed offset, size or stride: {short_repr((offset, size, stride))}")
        if backward_hooks or metadata:
            raise refuse("a tensor carries backward hooks or metadata; network weights have neither")
        numel = storage.flat.numel()
        last = offset + sum((s - 1) * st for s, st in zip(size, stride)) if math.prod(size) else offset - 1
        if last >= numel or offset > numel:
            raise refuse(f"a tensor of size {size} at offset {offset} reaches past its storage of {numel} elements")
        return torch.as_strided(storage.flat, size, stride, offset)

    def _rebuild_parameter(self, data: Any = None, requires_grad: Any = False, backward_hooks: Any = None,
                           state: Any = None) -> torch.Tensor:
        if type(data) is not torch.Tensor:
            raise refuse(f"torch._utils._rebuild_parameter got a {type(data).__name__}, not a tensor")
        if backward_hooks:
            raise refuse("a parameter carries backward hooks; network weights have none")
        return data

    def _load_storage(self, blob: Any = None) -> _Storage:
        return _decode_storage(blob)

    def _numpy_reconstruct(self, subtype: Any = None, shape: Any = None, code: Any = None) -> Any:
        if subtype is not self._ndarray:
            raise refuse(f"numpy.core.multiarray._reconstruct of {short_repr(subtype)}; only numpy.ndarray is read")
        return self._ndarray()

    def _numpy_frombuffer(self, buf: Any = None, dtype: Any = None, shape: Any = None, order: Any = "C") -> Any:
        if order not in ("C", "F"):
            raise refuse(f"a numpy array has memory order {short_repr(order)}")
        return self._ndarray().set(shape, dtype, buf)

    def _numpy_scalar(self, dtype: Any = None, data: Any = None) -> int | float | bool:
        if not isinstance(dtype, self._dtype) or not isinstance(data, bytes):
            raise refuse(f"numpy scalar of {short_repr(dtype)} is not a number stored as bytes")
        try:
            return struct.unpack(_BYTE_ORDERS[dtype.byteorder] + _NUMPY_FORMATS[dtype.code], data)[0]
        except struct.error:
            raise refuse(f"numpy scalar of type {dtype.code} has {len(data)} bytes") from None


def _numpy_array_class(dtype_class: type) -> type:
    class NumpyArray:
        """numpy.ndarray, as data: its shape, number type code and raw bytes, checked for size."""

        shape: tuple | None = None
        code: str | None = None
        raw: bytes = b""

        def set(self, shape: Any, dtype: Any, raw: Any) -> "NumpyArray":
            if not (isinstance(shape, tuple) and all(_is_int(n) and n >= 0 for n in shape)):
                raise refuse(f"a numpy array has a malformed shape {short_repr(shape)}")
            if not isinstance(dtype, dtype_class):
                raise refuse(f"a numpy array holds {short_repr(dtype)}, not numbers (object arrays are not read)")
            size = math.prod(shape) * struct.calcsize(_NUMPY_FORMATS[dtype.code])
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != size:
                raise refuse(f"a numpy array of shape {shape} and type {dtype.code} does not hold {size} bytes")
            self.shape, self.code, self.raw = shape, dtype.code, bytes(raw)
            return self

        def __setstate__(self, state: Any) -> None:
            if not (isinstance(state, tuple) and len(state) == 5):
                raise refuse(f"a numpy array has a malformed state {short_repr(state)}")
            self.set(state[1], state[2], state[4])

    return NumpyArray


def _numpy_dtype_class() -> type:
    class NumpyDType:
        """numpy.dtype, as far as a pickled number needs it: its type code and byte order."""

        def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
            if code not in _NUMPY_FORMATS:
                raise refuse(f"numpy.dtype {short_repr(code)} is not a number type (only bool, int, uint, float)")
            self.code = code
            self.byteorder = "="

        def __setstate__(self, state: Any) -> None:
            if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in _BYTE_ORDERS):
                raise refuse(f"numpy.dtype {self.code} has a malformed state {short_repr(state)}")
            self.byteorder = state[1]

    return NumpyDType


def read_network_pickle(data: bytes) -> Any:
    """The pickle's top-level object, read as data (see the module docstring for what is resolved)."""
    if not is_network_pickle(data):
        raise refuse("not a pickle (a network pickle begins with the PROTO opcode, protocol 2 to 5)")
    try:
        return _Reader(data).load()
    except InvalidArgument:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in text or "Ran out" in text:
            raise refuse(f"the pickle ends early (truncated): {text}") from None
        raise refuse(f"malformed pickle: {text}") from None
    except Exception as exc:  # noqa: BLE001 -- any other failure of a hostile stream is bad input
        raise refuse(f"malformed pickle ({type(exc).__name__}: {short_repr(str(exc))})") from None
