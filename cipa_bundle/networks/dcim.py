"""DCIM: CIPA's dynamic cross-modality interaction module."""

from __future__ import annotations

import torch
import torch.nn as nn

from cipa_bundle.networks.blocks import SS2D

__all__ = ["CrossModalInteraction"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CrossModalInteraction(nn.Module):
    """Local CT windows scanned by Mamba, each enriched by one regional PET token scanned by another Mamba.

    * Local branch (CT): two conv-BN-ReLU layers (C -> C/4 -> C), then the map is cut into non-overlapping
      ``window x window`` windows; each window is normalised as a whole (``LayerNorm(window**2 * C)``) and scanned
      by its own in-window :class:`SS2D` (residual).
    * Regional branch (PET): four conv-BN-ReLU layers (C -> C/16 -> C/8 -> C/4 -> C, the middle two with stride 2),
      giving one token per window; the token grid is scanned by :class:`SS2D` (residual).
    * Interaction: each regional token is added to all tokens of its window, and the windows are put back.

    The output is the interaction term only; CIPA adds it to the raw CT + PET features.

    Args:
        channels: C.
        d_state: state size of both scans.
        window: window side in feature pixels (4 in the paper; the two stride-2 convs tie it to 4).
    """

    def __init__(self, channels: int, d_state: int = 16, window: int = 4) -> None:
        super().__init__()
        if window != 4:
            raise ValueError(f"window must be 4 (the regional stem downsamples by exactly 4), got {window}")
        self.window = window
        self.local_stem = nn.Sequential(*_conv_bn_relu(channels, channels // 4, 1), *_conv_bn_relu(channels // 4, channels, 1))
        self.regional_stem = nn.Sequential(
            *_conv_bn_relu(channels, channels // 16, 1),
            *_conv_bn_relu(channels // 16, channels // 8, 2),
            *_conv_bn_relu(channels // 8, channels // 4, 2),
            *_conv_bn_relu(channels // 4, channels, 1),
        )
        self.regional_norm = nn.LayerNorm(channels)
        self.regional_ssm = SS2D(channels, d_state=d_state)
        self.local_norm = nn.LayerNorm(window * window * channels)
        self.local_ssm = SS2D(channels, d_state=d_state)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
        """Interaction term from (rectified) CT and PET features.

        Args:
            ct: ``(B, C, H, W)``, H and W multiples of ``window``.
            pet: ``(B, C, H, W)``.

        Returns:
            ``(B, C, H, W)``.
        """
        batch, channels, height, width = ct.shape
        w = self.window
        if height % w or width % w:
            raise ValueError(f"DCIM needs feature maps divisible by {w}, got {height}x{width}")
        rows, cols = height // w, width // w

        regional = self.regional_stem(pet).permute(0, 2, 3, 1)  # (B, rows, cols, C)
        regional = regional + self.regional_ssm(self.regional_norm(regional))

        local = self.local_stem(ct)
        # (B, C, rows, w, cols, w) -> (B, rows*cols, w*w*C): windows row-major, pixels row-major inside a window
        windows = local.view(batch, channels, rows, w, cols, w).permute(0, 2, 4, 3, 5, 1)
        windows = windows.reshape(batch, rows * cols, w * w * channels)
        normed = self.local_norm(windows).view(batch * rows * cols, w, w, channels)
        windows = windows.view(batch * rows * cols, w, w, channels) + self.local_ssm(normed)

        windows = windows.view(batch, rows, cols, w, w, channels) + regional[:, :, :, None, None, :]
        return windows.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)
