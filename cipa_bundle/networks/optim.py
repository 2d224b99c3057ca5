"""Optimizer parameter groups for CIPA."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["param_groups", "no_weight_decay"]


def no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Parameters exempt from weight decay: biases, norm weights and other 1-D scales, ``A_log`` and ``D``.

    1-D tensors cover biases, LayerNorm/BatchNorm weights, ``D`` and the decoder's ``scale1``/``scale2``;
    ``dt_proj_bias`` (2-D) is a bias and ``A_log`` (2-D) sets the state decay rates, which Mamba exempts too.
    """
    return parameter.ndim <= 1 or name.endswith(("bias", "A_log", ".D"))


def param_groups(model: nn.Module, weight_decay: float = 1e-2) -> list[dict]:
    """Two AdamW groups covering *every* trainable parameter of ``model``.

    The official ``group_weight`` collects only Linear/Conv/Norm parameters, so the scan parameters and decoder
    scales (8.67 M in the default model) never reach its optimizer; here all of them do.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]``.
    """
    decay, exempt = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (exempt if no_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
