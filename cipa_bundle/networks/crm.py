"""CRM: CIPA's channel-wise rectification module."""

from __future__ import annotations

import torch
import torch.nn as nn

from cipa_bundle.networks.blocks import SS1D

__all__ = ["ChannelRectification"]


class ChannelRectification(nn.Module):
    """Reweight every CT and PET channel from a Mamba scan over the sequence of all 2C channels.

    Each channel's whole spatial map is one token: the ``2C`` tokens (CT channels first, then PET) are normalised
    over space (``LayerNorm(H*W)``), projected to ``hidden`` features, scanned by :class:`SS1D` along the channel axis,
    and mapped to one sigmoid weight per channel. The output is the residual gate ``x * (1 + w)``.

    Because the first layers act on the flattened ``H*W`` map, the module is tied to one feature-map size: CIPA builds
    it from the input size (``spatial_size = (H / 4 / 2**i, W / 4 / 2**i)`` at stage i).

    Args:
        channels: C, the width of each modality's feature map.
        spatial_size: ``(H, W)`` of the feature maps this module accepts.
        hidden: token width after projection (96 at every stage in the paper).
        d_state: SS1D state size.
    """

    def __init__(self, channels: int, spatial_size: tuple[int, int], hidden: int = 96, d_state: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.spatial_size = tuple(spatial_size)
        area = self.spatial_size[0] * self.spatial_size[1]
        self.spatial_norm = nn.LayerNorm(area)
        self.spatial_proj = nn.Linear(area, hidden)
        self.act = nn.GELU()
        self.channel_scan = SS1D(hidden, d_state=d_state)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectify both modalities.

        Args:
            ct: ``(B, C, H, W)`` CT features.
            pet: ``(B, C, H, W)`` PET features.

        Returns:
            ``(ct * (1 + w_ct), pet * (1 + w_pet))``, each ``(B, C, H, W)``.
        """
        if tuple(ct.shape[-2:]) != self.spatial_size:
            raise ValueError(f"CRM was built for {self.spatial_size} feature maps, got {tuple(ct.shape[-2:])}")
        tokens = torch.cat([ct, pet], dim=1).flatten(2)  # (B, 2C, H*W)
        tokens = self.act(self.spatial_proj(self.spatial_norm(tokens)))
        weights = torch.sigmoid(self.head(self.norm(self.channel_scan(tokens))))  # (B, 2C, 1)
        w_ct, w_pet = weights.unsqueeze(-1).split(self.channels, dim=1)
        return ct + w_ct * ct, pet + w_pet * pet
