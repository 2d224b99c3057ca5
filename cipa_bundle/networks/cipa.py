"""CIPA: Cross-Modal Interactive Perception Network with Mamba (Mei et al., CVPR 2025, arXiv 2503.17261)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cipa_bundle.networks.checkpointing import checkpointed
from cipa_bundle.networks.crm import ChannelRectification
from cipa_bundle.networks.dcim import CrossModalInteraction
from cipa_bundle.networks.decoder import MambaDecoder
from cipa_bundle.networks.encoder import VMambaEncoder
from cipa_bundle.networks.official_keys import load_vmamba_pretrained

__all__ = ["CIPA"]

#: The encoder output stride at stage 0 (4) times the three patch mergings (8), times DCIM's 4x4 window at stage 3.
SIZE_MULTIPLE = 128


class CIPA(nn.Module):
    """CIPA PET-CT segmentation network.

    One VMamba encoder, shared by both modalities, extracts four feature levels from CT and from PET. At each level,
    CRM (:class:`~cipa_bundle.networks.crm.ChannelRectification`) reweights the channels of both modalities, DCIM
    (:class:`~cipa_bundle.networks.dcim.CrossModalInteraction`) lets PET regions inform CT windows, and the fused
    map ``CT_i + PET_i + DCIM_i(CRM_i(CT_i, PET_i))`` goes to the Mamba decoder
    (:class:`~cipa_bundle.networks.decoder.MambaDecoder`).

    MONAI-style interface: the input is one tensor with channel 0 = CT and channel 1 = PET, each already normalised
    (see ``cipa_bundle.preprocessing.transforms.NormalizeCIPAInput``); each modality is replicated to the 3 channels of
    the ImageNet patch embedding inside the model. The output is one channel of logits (apply a sigmoid for
    probabilities). The official code instead takes ``model(ct_3ch, pet_3ch)`` and its loader stacks [PET, CT].

    Defaults are the paper's configuration (54,572,198 parameters). CRM's layers are sized to the feature-map area,
    so the network accepts exactly ``img_size`` inputs.

    Args:
        img_size: input ``H = W`` (int) or ``(H, W)``; each a multiple of 128.
        dims: encoder width at stage 0 (int, doubled at each stage) or the four stage widths.
        depths: VSS blocks per encoder stage.
        decoder_depths: CVSS blocks per decoder stage, listed like ``dims`` (shallow to deep).
        d_state: state size of the encoder, CRM and DCIM scans.
        decoder_d_state: state size of the decoder scans.
        crm_hidden: CRM token width.
        out_channels: logit channels.
        drop_path_rate: encoder stochastic depth (0 for VMamba-T in CIPA).
        decoder_drop_path_rate: decoder stochastic depth.
        pretrained: optional path to VMamba-T ImageNet weights for the encoder (never downloaded).
        use_checkpoint: activation checkpointing, as MONAI's SwinUNETR has it: each VSS block, each CRM + DCIM pair
            and each decoder block is recomputed in the backward pass instead of keeping its activations. The
            function, the gradients and the batch-norm statistics are the same; a training step takes about one
            more forward pass of time and far less memory (a 512 x 512 step at batch 4 needs it to fit 24 GB on a
            CPU: docs/performance.md). No effect under ``torch.no_grad()``. Not part of the state_dict.

    Shapes:
        input ``(B, 2, H, W)``; output ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 512,
        dims: int | Sequence[int] = 96,
        depths: Sequence[int] = (2, 2, 9, 2),
        decoder_depths: Sequence[int] = (4, 4, 4, 4),
        d_state: int = 16,
        decoder_d_state: int = 4,
        crm_hidden: int = 96,
        out_channels: int = 1,
        drop_path_rate: float = 0.0,
        decoder_drop_path_rate: float = 0.1,
        pretrained: str | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(size) != 2 or any(s <= 0 or s % SIZE_MULTIPLE for s in size):
            raise ValueError(f"img_size must be one or two positive multiples of {SIZE_MULTIPLE}, got {img_size}")
        widths = tuple(dims * 2**i for i in range(4)) if isinstance(dims, int) else tuple(int(d) for d in dims)
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"CIPA has 4 stages: got dims={dims}, depths={depths}")
        self.img_size = size
        self.use_checkpoint = use_checkpoint
        self.encoder = VMambaEncoder(3, widths, depths, d_state, drop_path_rate, use_checkpoint=use_checkpoint)
        feature_sizes = [(size[0] // (4 * 2**i), size[1] // (4 * 2**i)) for i in range(4)]
        self.crm = nn.ModuleList(
            ChannelRectification(c, hw, crm_hidden, d_state) for c, hw in zip(widths, feature_sizes)
        )
        self.dcim = nn.ModuleList(CrossModalInteraction(c, d_state) for c in widths)
        self.decoder = MambaDecoder(
            widths, decoder_depths, out_channels, decoder_d_state, decoder_drop_path_rate, use_checkpoint=use_checkpoint
        )
        if pretrained:
            load_vmamba_pretrained(self.encoder, pretrained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` [CT, PET] -> ``(B, out_channels, H, W)`` logits."""
        if x.ndim != 4 or x.shape[1] != 2 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"CIPA expects input of shape (B, 2, {self.img_size[0]}, {self.img_size[1]}) with channel 0 = CT and "
                f"channel 1 = PET, got {tuple(x.shape)}"
            )
        # Plain tensors inside: a MetaTensor would carry its metadata through hundreds of small ops, which costs more
        # than the ops themselves at demo sizes. Callers (SliceInferer, Invertd) keep the metadata outside.
        if type(x) is not torch.Tensor:  # keeps plain tensors untouched, which torch.export needs
            x = x.as_subclass(torch.Tensor)
        batch = x.shape[0]
        # Both modalities go through the shared encoder in one batch: identical to two calls (the encoder has
        # no batch statistics) and faster.
        modalities = torch.cat([x[:, 0:1], x[:, 1:2]], dim=0).expand(-1, 3, -1, -1)
        fused = []
        for features, crm, dcim in zip(self.encoder(modalities), self.crm, self.dcim):
            ct, pet = features[:batch], features[batch:]
            fused.append(ct + pet + self._interaction(crm, dcim)(ct, pet))
        logits = self.decoder(fused)
        if tuple(logits.shape[2:]) != self.img_size:
            logits = F.interpolate(logits, size=self.img_size, mode="bilinear", align_corners=False)
        return logits

    def _interaction(self, crm: nn.Module, dcim: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(ct, pet) -> DCIM(CRM(ct, pet))`` at one level, recomputed in the backward pass with ``use_checkpoint``."""

        def interact(ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
            return dcim(*crm(ct, pet))

        if not self.use_checkpoint:
            return interact
        return checkpointed(nn.ModuleList([crm, dcim]), interact)
