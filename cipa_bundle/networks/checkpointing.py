"""Activation checkpointing for CIPA's blocks: recompute a block's forward pass in the backward pass instead of
keeping its activations.

At the paper's 512 x 512 input a training step at batch 4 keeps more activations than a 24 GB machine has
(docs/performance.md, "Training at the paper's size"): each SS2D block holds its four scan directions, their
projections and the scan states. Recomputing each block in the backward pass keeps only the block inputs, at the
cost of a second forward pass through each block.

Two details make the recomputed function exactly the original one:

* ``torch.utils.checkpoint`` restores the random-number state before recomputing, so DropPath draws the same masks.
* Batch norm layers in training mode (DCIM's stems) update their running statistics in every forward pass, so a
  recomputation would update them twice. :func:`checkpointed` snapshots those buffers before the recomputation and
  puts them back after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["buffers_kept", "checkpointed"]


@contextlib.contextmanager
def buffers_kept(module: nn.Module, layer_types: tuple[type[nn.Module], ...] | None = None) -> Iterator[None]:
    """Run the enclosed code, then restore the buffers of ``module`` to their values before it.

    Args:
        module: whose buffers to protect.
        layer_types: only the buffers of these sub-module types (e.g. batch norms); ``None``: every buffer.
    """
    layers = [m for m in module.modules() if layer_types is None or isinstance(m, layer_types)]
    saved = [(buffer, buffer.detach().clone()) for layer in layers for buffer in layer.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def checkpointed(module: nn.Module, function: Callable[..., torch.Tensor] | None = None) -> Callable[..., torch.Tensor]:
    """``module`` (or ``function``, a computation made of ``module``'s layers) wrapped to be recomputed in the
    backward pass whenever autograd records it.

    Under ``torch.no_grad()`` (inference, validation) the wrapper calls the function directly: there is nothing to
    save memory on.

    Args:
        module: the block whose activations are not kept; its batch-norm buffers are protected from the
            recomputation's second update.
        function: what to run, if not ``module`` itself (e.g. ``lambda ct, pet: dcim(*crm(ct, pet))``).

    Returns:
        A callable with the signature and result of ``function`` (or ``module``).
    """
    run = module if function is None else function

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), buffers_kept(module, (nn.modules.batchnorm._BatchNorm,))

    def call(*args: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return run(*args)
        return checkpoint(run, *args, use_reentrant=False, context_fn=contexts)

    return call
