"""The VMamba encoder (VMamba-T "v0" as configured by CIPA), shared by the CT and PET branches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import DropPath

from cipa_bundle.networks.blocks import SS2D, drop_path_schedule
from cipa_bundle.networks.checkpointing import checkpointed

__all__ = ["VMambaEncoder", "VSSBlock", "PatchMerging"]


class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LayerNorm(x)))``; VMamba-T v0 has no MLP branch (``mlp_ratio=0``).

    Args:
        dim: channels C.
        d_state: SS2D state size.
        drop_path: stochastic-depth rate.
    """

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ssm = SS2D(dim, d_state=d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return x + self.drop_path(self.ssm(self.norm(x)))


class PatchMerging(nn.Module):
    """Halve the resolution and double the width: 2×2 neighbours -> LayerNorm(4C) -> Linear(4C, 2C, no bias).

    The neighbours are concatenated in VMamba's order (0,0), (1,0), (0,1), (1,1) as (row, column) offsets, which the
    pretrained ``reduction`` weights depend on.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""
        merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(merged))


class EncoderStage(nn.Module):
    """``depth`` VSS blocks; the patch merging that follows is applied by the encoder after the stage output.

    With ``use_checkpoint`` each block is recomputed in the backward pass (:mod:`cipa_bundle.networks.checkpointing`).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        d_state: int,
        drop_paths: Sequence[float],
        downsample: bool,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, d_state, drop_paths[i]) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        for block in self.blocks:
            x = checkpointed(block)(x) if self.use_checkpoint else block(x)
        return x


class VMambaEncoder(nn.Module):
    """VMamba hierarchical encoder returning one normalised feature map per stage.

    A 4×4 stride-4 patch embedding is followed by four stages of VSS blocks with patch merging between them. Each
    stage's output, *before* merging, goes through its own LayerNorm (``out_norms``).

    Args:
        in_channels: input channels (3: the ImageNet patch embedding; CIPA replicates each modality).
        dims: stage widths, e.g. ``(96, 192, 384, 768)`` for VMamba-T.
        depths: blocks per stage, e.g. ``(2, 2, 9, 2)``.
        d_state: SS2D state size.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        patch_size: stride of the patch embedding.
        use_checkpoint: recompute each VSS block in the backward pass instead of keeping its activations (same
            function and gradients, less memory, about one more forward pass of time).

    Shapes:
        input ``(B, in_channels, H, W)``; output list of ``(B, dims[i], H / (patch_size * 2**i), W / ...)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 9, 2),
        d_state: int = 16,
        drop_path_rate: float = 0.0,
        patch_size: int = 4,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {list(dims)} and depths {list(depths)} must have the same length")
        self.dims = tuple(dims)
        self.patch_embed = nn.Conv2d(in_channels, dims[0], patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(dims[0])
        rates = drop_path_schedule(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList(
            EncoderStage(
                dims[i],
                depths[i],
                d_state,
                rates[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample=i < len(dims) - 1,
                use_checkpoint=use_checkpoint,
            )
            for i in range(len(dims))
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.apply(_init_vmamba_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, in_channels, H, W)`` -> list of ``(B, C_i, H_i, W_i)``."""
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        features = []
        for stage, out_norm in zip(self.stages, self.out_norms):
            x = stage(x)
            features.append(out_norm(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return features


def _init_vmamba_weights(module: nn.Module) -> None:
    """VMamba's init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
