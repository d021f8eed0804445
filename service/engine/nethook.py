"""Hooks on a generator's rewritable layers, owned by context managers.

- ``Trace(model, layer, ...)``: capture a layer's keys and values, replace its output, stop early.
- ``latents_to_keys(model, layer, z)``: the keys (and extra layer inputs) for latents.
- ``keys_to_values(model, layer, key, *extras)``: run only the layer.
- ``values_to_image(model, layer, z, values)``: render with the layer's output replaced.
- ``replace_output(model, layer, fn)``: a context in which every forward pass rewrites the
  layer's output with ``fn`` (unit ablation and insertion).
- ``hook_count(model)``: how many hooks are registered (tests assert it returns to zero).

Hooks are registered on the shared model, so a traced forward pass must not run concurrently
with another pass on the same model object; callers that serve requests serialize them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:      # annotations only: generators/base uses Trace, so no import cycle at run time
    from rulewright.service.engine.generators.base import Generator


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once everything needed was captured."""


class Trace:
    """Capture (and optionally replace) the keys and values of one rewritable layer.

    Example::

        with Trace(model, "main.6", stop=True) as tr:
            model(z)
        tr.key, tr.extras, tr.value

    Options:
    - ``retain_key`` / ``retain_value``: keep the layer's input key / output value.
    - ``edit_value``: a function ``value -> value`` whose result replaces the layer's output.
    - ``stop``: end the pass after the last retained tensor (the rest of the model never runs).
    Hooks are removed on exit whatever happens, and ``StopForward`` is swallowed there.
    """

    def __init__(
        self,
        model: Generator,
        layer: str,
        retain_key: bool = True,                          # keep the key (input of the layer)
        retain_value: bool = True,                        # keep the value (output of the layer)
        edit_value: Callable[[torch.Tensor], torch.Tensor] | None = None,  # rewrite the output
        stop: bool = False,                               # end the pass once captured
    ):
        spec = model.layer(layer)
        self.key: torch.Tensor | None = None
        self.extras: tuple[Any, ...] = ()
        self.value: torch.Tensor | None = None
        self._stop_after_key = stop and not retain_value and edit_value is None
        self._stop_after_value = stop and not self._stop_after_key
        self._retain_key = retain_key
        self._retain_value = retain_value
        self._edit = edit_value
        self._handles = []
        if retain_key or self._stop_after_key:
            self._handles.append(spec.modules[0].register_forward_pre_hook(self._on_input))
        if retain_value or edit_value is not None or self._stop_after_value:
            self._handles.append(spec.modules[-1].register_forward_hook(self._on_output))

    def _on_input(self, module: nn.Module, args: tuple) -> None:
        if self._retain_key:
            self.key, self.extras = args[0], tuple(args[1:])
        if self._stop_after_key:
            raise StopForward

    def _on_output(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if self._edit is not None:
            output = self._edit(output)
        if self._retain_value:
            self.value = output
        if self._stop_after_value:
            raise StopForward
        return output

    def close(self) -> None:
        """Remove every hook this trace registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


@dataclasses.dataclass
class Keys:
    """Keys at a layer, with the extra inputs the layer needs to turn them into values."""

    key: torch.Tensor                 # (N, C_in, H, W)
    extras: tuple[Any, ...]           # e.g. StyleGAN2's per-sample style and the noise map


def latents_to_keys(model: Generator, layer: str, z: torch.Tensor, truncation: float = 1.0) -> Keys:
    """Run the model up to ``layer`` and return its keys; the rest of the model never runs."""
    with Trace(model, layer, retain_value=False, stop=True) as tr:
        model(z, truncation)
    return Keys(tr.key, tr.extras)


def latents_to_values(model: Generator, layer: str, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
    """Run the model up to and including ``layer`` and return its values."""
    with Trace(model, layer, retain_key=False, stop=True) as tr:
        model(z, truncation)
    return tr.value


def keys_to_values(model: Generator, layer: str, key: torch.Tensor, *extras: Any) -> torch.Tensor:
    """Run only ``layer`` on keys (and their extras) with the model's current weights."""
    return model.layer(layer).keys_to_values(key, *extras)


def values_to_image(
    model: Generator, layer: str, z: torch.Tensor, values: torch.Tensor, truncation: float = 1.0
) -> torch.Tensor:
    """Render images for ``z`` with ``layer``'s output replaced by ``values`` (gradients flow to them)."""
    if values.shape[0] != z.shape[0]:
        raise ValueError(f"values batch {values.shape[0]} differs from latents batch {z.shape[0]}")

    def swap(output: torch.Tensor) -> torch.Tensor:
        if output.shape != values.shape:
            raise ValueError(f"values shape {tuple(values.shape)} differs from layer output {tuple(output.shape)}")
        return values

    with Trace(model, layer, retain_key=False, retain_value=False, edit_value=swap):
        return model(z, truncation)


def replace_output(model: Generator, layer: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Trace:
    """A context in which every pass rewrites ``layer``'s output with ``fn`` (unit interventions)."""
    return Trace(model, layer, retain_key=False, retain_value=False, edit_value=fn)


def hook_count(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
