"""Read a target's activations from a model, stopping the forward pass right after it.

A forward hook on the target module captures its output at the right call and
raises :class:`_StopForward`, so blocks after the target never run (layer 0 of a
12-block ViT costs one block, not twelve). The graph up to the target stays
intact, so gradients flow back to the input. Hooks live only inside one call
(a context manager removes them even on error): nothing leaks into the model.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
from torch import nn

from pipeline.models.zoo import LayerInfo, ModelLayout, TargetSite


class _StopForward(Exception):
    """Raised by the capture hook once the target is read; never escapes this module."""


@contextmanager
def _capture(module: nn.Module, call: int, stop: Callable[[], bool]):
    """Captures ``module``'s output at its ``call``-th run; then ends the forward if ``stop()`` says so."""
    captured: list[torch.Tensor] = []
    calls = 0

    def hook(_module, _inputs, output):
        nonlocal calls
        if calls == call:
            captured.append(output)
            if stop():
                raise _StopForward
        calls += 1

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class ActivationReader:
    """Patch-token activations of one target of a model: (batch, patches, features)."""

    def __init__(self, model: nn.Module, layout: ModelLayout):
        self.model = model
        self.layout = layout
        self._modules = dict(model.named_modules())

    def __call__(self, images: torch.Tensor, layer: int, target: str = "mlp", truncate: bool = True) -> torch.Tensor:
        """``images`` are already normalized for the model. ``truncate=False`` runs the full forward."""
        info = self.layout.layer(layer)
        site = self.layout.site(layer, target)
        with _capture(self._modules[site.module], site.call, stop=lambda: truncate) as captured:
            try:
                self.model(images)
            except _StopForward:
                pass
        return _patch_tokens(captured[0], info, site)

    def read_layers(self, images: torch.Tensor, layers: list[int], target: str = "mlp") -> dict[int, torch.Tensor]:
        """One forward for several layers of one target: layer -> (batch, patches, features)."""
        read = self.read_sites(images, [(layer, target) for layer in layers])
        return {layer: tokens for (layer, _), tokens in read.items()}

    def read_sites(self, images: torch.Tensor, sites: list[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        """One forward for several (layer, target) sites, stopped as soon as every one is read (whichever module
        runs last, several targets of one block included): (layer, target) -> (batch, patches, features)."""
        wanted = sorted(set(sites))
        with ExitStack() as stack:
            captured: dict[tuple[int, str], list[torch.Tensor]] = {}

            def all_read() -> bool:
                return all(captured.values())

            for layer, target in wanted:
                site = self.layout.site(layer, target)
                captured[layer, target] = stack.enter_context(
                    _capture(self._modules[site.module], site.call, stop=all_read))
            try:
                self.model(images)
            except _StopForward:
                pass
        return {(layer, target): _patch_tokens(out[0], self.layout.layer(layer), self.layout.site(layer, target))
                for (layer, target), out in captured.items()}


def _patch_tokens(output: torch.Tensor | tuple, info: LayerInfo, site: TargetSite) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # a block returning one tensor per scale (CoaT's parallel blocks)
        output = output[site.output_index]
    if output.dim() == 4:  # (B, H, W, C) token maps have no prefix tokens
        output = output.flatten(1, 2)
    else:  # prefix tokens (CLS, distillation) come first in every supported family
        output = output[:, info.prefix_tokens:]
    return output[..., site.channel_offset: site.channel_offset + site.features]
