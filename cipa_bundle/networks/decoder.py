"""CIPA's Mamba decoder (Sigma's MambaDecoder): additive skips, CVSS blocks, bilinear upsampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath

from cipa_bundle.networks.blocks import SS2D, drop_path_schedule
from cipa_bundle.networks.checkpointing import checkpointed

__all__ = ["MambaDecoder", "CVSSDecoderBlock", "ChannelAttention"]


def _resize_channels_last(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a ``(B, H, W, C)`` map to ``size = (H', W')``."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _upsample2_channels_last(x: torch.Tensor) -> torch.Tensor:
    return _resize_channels_last(x, (2 * x.shape[1], 2 * x.shape[2]))


class ChannelAttention(nn.Module):
    """Squeeze-excitation over average- and max-pooled descriptors sharing one bottleneck.

    Args:
        channels: C.
        squeeze_factor: bottleneck width is ``C // squeeze_factor`` (must be >= 1).
    """

    def __init__(self, channels: int, squeeze_factor: int = 30) -> None:
        super().__init__()
        hidden = channels // squeeze_factor
        if hidden < 1:
            raise ValueError(f"channels ({channels}) must be >= squeeze_factor ({squeeze_factor})")
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.SiLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        pooled = self.fc(x.mean(dim=(2, 3), keepdim=True)) + self.fc(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(pooled)


class CVSSDecoderBlock(nn.Module):
    """Decoder block: a scaled residual SS2D followed by a scaled residual conv-attention block (CAB).

    ``x = in * scale1 + DropPath(SS2D(LN(in)))``, then ``out = CAB(LN(x)) + x * scale2`` with
    ``CAB = conv3x3(C, C/3) -> GELU -> conv3x3(C/3, C) -> ChannelAttention``.

    Args:
        dim: channels C.
        d_state: SS2D state size (4 in the paper's decoder).
        drop_path: stochastic-depth rate of the SS2D branch.
        compress_ratio: CAB bottleneck divisor.
        squeeze_factor: channel-attention bottleneck divisor.
    """

    def __init__(
        self, dim: int, d_state: int = 4, drop_path: float = 0.0, compress_ratio: int = 3, squeeze_factor: int = 30
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ssm = SS2D(dim, d_state=d_state)
        self.scale1 = nn.Parameter(torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        hidden = dim // compress_ratio
        self.cab = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 3, padding=1),
            ChannelAttention(dim, squeeze_factor),
        )
        self.scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        x = x * self.scale1 + self.drop_path(self.ssm(self.norm1(x)))
        conv_out = self.cab(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return conv_out + x * self.scale2


class PatchExpand(nn.Module):
    """Double the resolution and halve the width by pixel shuffle: Linear(C, 2C) -> 2×2 rearrange -> LayerNorm(C/2).

    Output pixel ``(2h + p1, 2w + p2)`` takes the expanded channels ``[(2*p1 + p2) * C/2, (2*p1 + p2 + 1) * C/2)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, 2H, 2W, C/2)``."""
        batch, height, width, channels = x.shape
        x = self.expand(x).view(batch, height, width, 2, 2, channels // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, channels // 2)
        return self.norm(x)


class UpsampleExpand(nn.Module):
    """Linear(C, C/2) -> bilinear ×2 -> LayerNorm(C/2), channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim // 2, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, 2H, 2W, C/2)``."""
        return self.norm(_upsample2_channels_last(self.linear(x)))


class FinalUpsample(nn.Module):
    """×4 upsampling of the last decoder map: Linear -> bilinear ×2 -> Linear -> bilinear ×2 -> LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, 4H, 4W, C)``."""
        x = _upsample2_channels_last(self.linear1(x))
        return self.norm(_upsample2_channels_last(self.linear2(x)))


class DecoderStage(nn.Module):
    """Skip addition, CVSS blocks (each recomputed in the backward pass with ``use_checkpoint``), then optional
    :class:`UpsampleExpand`."""

    def __init__(
        self,
        dim: int,
        depth: int,
        d_state: int,
        drop_paths: Sequence[float],
        upsample: bool,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CVSSDecoderBlock(dim, d_state, drop_paths[i]) for i in range(depth))
        self.upsample = UpsampleExpand(dim) if upsample else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``(B, H/2, W/2, 2C)`` (or the expanded deepest map) and a ``(B, H, W, C)`` skip -> the next stage's input."""
        x = _resize_channels_last(x, skip.shape[1:3]) + skip
        for block in self.blocks:
            x = checkpointed(block)(x) if self.use_checkpoint else block(x)
        return self.upsample(x) if self.upsample is not None else x


class MambaDecoder(nn.Module):
    """Decode four fused feature maps to full-resolution logits.

    The deepest map is pixel-shuffled up (:class:`PatchExpand`); each shallower map is *added* (no concatenation)
    and refined by CVSS blocks; a ×4 upsampler and a bias-free 1×1 conv give the logits.

    Args:
        in_channels: widths of the four inputs, shallow to deep, e.g. ``(96, 192, 384, 768)``; each is twice the
            previous one.
        depths: blocks of the stage at width ``in_channels[k]`` (``depths[-1]`` only shapes the drop-path schedule,
            as in the official code).
        out_channels: logit channels.
        d_state: SS2D state size in the decoder blocks.
        drop_path_rate: stochastic depth, linearly increasing from the shallowest stage.
        use_checkpoint: recompute each CVSS block in the backward pass instead of keeping its activations.

    Shapes:
        inputs ``(B, C_i, H/4/2**i, W/4/2**i)`` for i = 0..3; output ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (4, 4, 4, 4),
        out_channels: int = 1,
        d_state: int = 4,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4 or len(depths) != 4:
            raise ValueError(f"MambaDecoder expects 4 stages, got in_channels={in_channels}, depths={depths}")
        rates = drop_path_schedule(drop_path_rate, sum(depths))
        self.expand = PatchExpand(in_channels[3])
        self.stages = nn.ModuleList(
            DecoderStage(
                in_channels[k],
                depths[k],
                d_state,
                rates[sum(depths[:k]) : sum(depths[: k + 1])],
                upsample=k > 0,
                use_checkpoint=use_checkpoint,
            )
            for k in (2, 1, 0)
        )
        self.norm = nn.LayerNorm(in_channels[0])
        self.final_upsample = FinalUpsample(in_channels[0])
        self.head = nn.Conv2d(in_channels[0], out_channels, 1, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[(B, C_i, H_i, W_i)] * 4`` -> ``(B, out_channels, 4 * H_0, 4 * W_0)``."""
        skips = [f.permute(0, 2, 3, 1) for f in features]
        x = self.expand(skips[3])
        for stage, skip in zip(self.stages, (skips[2], skips[1], skips[0])):
            x = stage(x, skip)
        x = self.final_upsample(self.norm(x))
        return self.head(x.permute(0, 3, 1, 2))
