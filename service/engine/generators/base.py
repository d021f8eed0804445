"""The contract every generator architecture follows, and the helpers they share.

- ``Generator``: an ``nn.Module`` mapping latents to images in [-1, 1], with named rewritable layers.
- ``LayerSpec``: where a rewritable layer's key enters and its value leaves, and its weight.
- ``LayerInfo``: the shapes of one layer, JSON-friendly, for listing.
- ``StateDictMismatch``: a state dict that does not fit, naming the missing, unexpected and
  mismatched keys.
- ``check_state_dict``: compare a state dict with the shapes an architecture expects.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from rulewright.service.engine.nethook import Trace


class StateDictMismatch(ValueError):
    """A state dict does not fit an architecture (becomes INVALID_ARGUMENT over the API)."""

    def __init__(
        self,
        arch: str,                                   # architecture that was being loaded
        missing: Sequence[str] = (),                 # keys the architecture needs and the dict lacks
        unexpected: Sequence[str] = (),              # keys in the dict the architecture does not use
        mismatched: Sequence[tuple[str, tuple, tuple]] = (),  # (key, expected shape, found shape)
        reason: str = "",                            # a problem that is not about one key
    ):
        self.arch = arch
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        self.reason = reason
        parts = []
        if reason:
            parts.append(reason)
        if self.missing:
            parts.append("missing keys: " + ", ".join(self.missing))
        if self.unexpected:
            parts.append("unexpected keys: " + ", ".join(self.unexpected))
        if self.mismatched:
            parts.append(
                "mismatched shapes: "
                + ", ".join(f"{k} expected {_fmt(e)} got {_fmt(g)}" for k, e, g in self.mismatched)
            )
        super().__init__(f"state dict does not fit {arch}: " + "; ".join(parts))


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_state_dict(
    arch: str, expected: Mapping[str, tuple], state: Mapping[str, torch.Tensor]
) -> None:
    """Raise ``StateDictMismatch`` unless ``state`` has exactly the keys and shapes ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(shape), tuple(state[k].shape))
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatch(arch, missing, unexpected, mismatched)


def require(arch: str, state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    """Fetch a tensor the size inference needs, or raise a mismatch naming it."""
    if key not in state:
        raise StateDictMismatch(arch, missing=[key])
    tensor = state[key]
    if tensor.ndim != ndim:
        raise StateDictMismatch(arch, reason=f"{key} must have {ndim} dimensions, got {_fmt(tuple(tensor.shape))}")
    return tensor


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One rewritable layer: the key is the first input of ``modules[0]``, the value the output of
    ``modules[-1]``; running the chain maps keys (plus ``extras``) to values.

    ``weight`` is the tensor an edit changes; ``in_axis`` is its input-channel axis (the axis the
    edit's direction contracts: 0 for ConvTranspose2d, 1 for Conv2d, 2 for StyleGAN2's 5-d weight).
    ``linear`` says whether the value is affine in ``weight`` (so a closed-form update exists).
    """

    name: str
    modules: tuple[nn.Module, ...]
    weight: nn.Parameter
    in_axis: int
    linear: bool
    weight_key: str = ""            # the weight's key in the public state dict (deltas name it)

    def keys_to_values(self, key: torch.Tensor, *extras: Any) -> torch.Tensor:
        """Run the layer on captured keys (and the extra inputs captured with them)."""
        out = self.modules[0](key, *extras)
        for module in self.modules[1:]:
            out = module(out)
        return out


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Shapes of one rewritable layer, as listed to users."""

    name: str
    key_shape: tuple[int, int, int]      # (channels, height, width) of the keys
    value_shape: tuple[int, int, int]    # (channels, height, width) of the values
    weight_shape: tuple[int, ...]
    in_axis: int
    linear: bool
    weight_key: str = ""

    @property
    def resolution(self) -> int:
        """Spatial size of the keys (the grid a context mask is resampled to)."""
        return self.key_shape[1]

    def to_dict(self) -> dict:
        """JSON-ready form (for the API and the CLI)."""
        d = dataclasses.asdict(self)
        d["resolution"] = self.resolution
        return d


class Generator(nn.Module, abc.ABC):
    """Latents to images in [-1, 1], shape (N, 3, R, R), with named rewritable layers.

    Subclasses build themselves from sizes inferred from a state dict in their public layout
    (``from_state_dict``) and implement ``forward(z, truncation)``.
    """

    arch: str = ""
    supports_truncation: bool = False

    def __init__(self, z_dim: int, resolution: int):
        super().__init__()
        self.z_dim = z_dim
        self.resolution = resolution
        self._layer_infos: list[LayerInfo] | None = None

    @classmethod
    @abc.abstractmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], share: bool = False) -> "Generator":
        """Infer sizes from ``state``, build the generator and load the weights (strictly).

        ``share=True`` makes the parameters *be* the given tensors (no copy), so generators of
        several versions share every tensor their edits leave alone; never edit those in place.
        """

    @abc.abstractmethod
    def config(self) -> dict:
        """JSON-ready sizes from which the architecture was built (stored in the registry)."""

    @abc.abstractmethod
    def layer_specs(self) -> list[LayerSpec]:
        """The rewritable layers, from input to output."""

    @abc.abstractmethod
    def default_layer(self) -> str:
        """The layer edits use when none is named (a mid-level one, as the paper recommends)."""

    def public_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the architecture's public layout (what ``from_state_dict`` reads back)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def public_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(public state-dict key, parameter) pairs: what deltas' ``weight_key`` names."""
        return [(spec.weight_key, spec.weight) for spec in self.layer_specs()]

    def layer(self, name: str) -> LayerSpec:
        """The rewritable layer ``name``; ``LookupError`` (NOT_FOUND) naming the choices if absent."""
        for spec in self.layer_specs():
            if spec.name == name:
                return spec
        names = ", ".join(s.name for s in self.layer_specs())
        raise LookupError(f"{self.arch} has no rewritable layer {name!r}; layers: {names}")

    def check_truncation(self, truncation: float | torch.Tensor) -> None:
        """Reject a truncation the architecture cannot honour (ValueError → INVALID_ARGUMENT).

        A tensor holds one truncation per image (architectures with the trick take that too).
        """
        if isinstance(truncation, torch.Tensor):
            for t in torch.unique(truncation).tolist():
                self.check_truncation(float(t))
            return
        if not 0.0 <= truncation <= 1.0 and self.supports_truncation:
            raise ValueError(f"truncation must lie in [0, 1], got {truncation}")
        if not self.supports_truncation and truncation != 1.0:
            raise ValueError(f"{self.arch} has no truncation trick; truncation must be 1, got {truncation}")

    def check_latents(self, z: torch.Tensor, truncation: float | torch.Tensor = 1.0) -> None:
        """Reject latents that are not (N, z_dim), and a truncation ``check_truncation`` refuses (ValueError)."""
        self.check_truncation(truncation)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"latents must have shape (N, {self.z_dim}), got {tuple(z.shape)}")

    def layer_infos(self) -> list[LayerInfo]:
        """Shapes of every rewritable layer, measured once by tracing one latent."""
        if self._layer_infos is None:
            infos = []
            param = next(self.parameters())
            z = torch.zeros(1, self.z_dim, device=param.device, dtype=param.dtype)
            for spec in self.layer_specs():
                with torch.no_grad(), Trace(self, spec.name, stop=True) as trace:
                    self(z)
                infos.append(
                    LayerInfo(
                        name=spec.name,
                        key_shape=tuple(trace.key.shape[1:]),
                        value_shape=tuple(trace.value.shape[1:]),
                        weight_shape=tuple(spec.weight.shape),
                        in_axis=spec.in_axis,
                        linear=spec.linear,
                        weight_key=spec.weight_key,
                    )
                )
            self._layer_infos = infos
        return self._layer_infos

    def upstream_names(self, layer: str) -> list[str]:
        """Names (``named_parameters`` style) of the parameters that run before ``layer``'s key.

        Found by recording which modules start a forward pass before the key is captured; a
        module's own parameters count (not its children's), so a container that is still running
        contributes only what its children did. Edits to any other parameter leave the keys, and
        so the statistics C of this layer, unchanged.
        """
        ran: list[nn.Module] = []
        param = next(self.parameters())
        z = torch.zeros(1, self.z_dim, device=param.device, dtype=param.dtype)
        # The trace's pre-hook is registered first, so it stops the pass before the layer's own
        # module is recorded: the edited weight itself is not upstream of its keys.
        with torch.no_grad(), Trace(self, layer, retain_value=False, stop=True):
            handles = [m.register_forward_pre_hook(lambda mod, args: ran.append(mod)) for m in self.modules()]
            try:
                self(z, 0.5 if self.supports_truncation else 1.0)
            finally:
                for h in handles:
                    h.remove()
        seen = {id(m) for m in ran}
        names = []
        for mod_name, module in self.named_modules():
            if id(module) in seen:
                names += [f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)]
        return sorted(names)

    def upstream_fingerprint(self, layer: str) -> str:
        """sha256 over the parameters upstream of ``layer`` and every buffer (statistics cache key).

        Buffers (BatchNorm statistics, noise maps, the truncation centre) are never edited, so
        hashing all of them keeps the key conservative without splitting versions apart.
        """
        params = dict(self.named_parameters())
        tensors = [(n, params[n]) for n in self.upstream_names(layer)] + sorted(self.named_buffers())
        return _fingerprint(f"{self.arch}:{layer}", tensors)

    def weights_fingerprint(self) -> str:
        """sha256 over every parameter and buffer (the key of statistics that read the whole model)."""
        return _fingerprint(f"{self.arch}:all", sorted(self.state_dict().items()))

    def train(self, mode: bool = True) -> "Generator":
        """Stay in eval mode: batch statistics over the few images of an edit are garbage, and eval-mode
        BatchNorm is affine, so it belongs to the value."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, z_dim={self.z_dim}, resolution={self.resolution}"


def _fingerprint(label: str, tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 of a label and named tensors (name, dtype, shape and bytes of each, in order)."""
    import hashlib

    digest = hashlib.sha256(label.encode())
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
