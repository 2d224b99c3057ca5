"""Translate the official CIPA code's weight names into this bundle's, and load VMamba's ImageNet weights.

The official state_dict (``backbone.vssm.*``, ``backbone.cross_mamba.*``, ``backbone.region_patch.*``,
``backbone.channel_attn_mamba.*``, ``decode_head.*``) maps one-to-one, with equal shapes, onto :class:`CIPA`'s
state_dict; only names change. Nothing here downloads anything.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from cipa_bundle.errors import CipaInputError
from cipa_bundle.networks.weights import load_checkpoint, state_dict_of

__all__ = [
    "convert_official_state_dict",
    "official_to_cipa_key",
    "load_vmamba_pretrained",
    "OfficialKeyError",
]

logger = logging.getLogger(__name__)


class OfficialKeyError(CipaInputError):
    """A checkpoint key that the official CIPA model does not have, or a missing one."""


# Parameter names inside every SS2D / SS1D module.
_SCAN_PARAMS = {
    "x_proj_weight": "core.x_proj_weight",
    "dt_projs_weight": "core.dt_proj_weight",
    "dt_projs_bias": "core.dt_proj_bias",
    "A_logs": "core.A_log",
    "Ds": "core.D",
    "conv2d": "conv",
}
_SCAN = r"(?P<ssm>x_proj_weight|dt_projs_weight|dt_projs_bias|A_logs|Ds|conv2d\.\w+|in_proj\.\w+|out_norm\.\w+|out_proj\.\w+)"

# (official pattern, our name). Patterns are matched in full; ``{ssm}`` receives the translated scan parameter.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"backbone\.vssm\.patch_embed\.0\.(?P<rest>\w+)", "encoder.patch_embed.{rest}"),
        (r"backbone\.vssm\.patch_embed\.2\.(?P<rest>\w+)", "encoder.patch_norm.{rest}"),
        (r"backbone\.vssm\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.norm\.(?P<rest>\w+)", "encoder.stages.{i}.blocks.{j}.norm.{rest}"),
        (r"backbone\.vssm\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\.op\." + _SCAN, "encoder.stages.{i}.blocks.{j}.ssm.{ssm}"),
        (r"backbone\.vssm\.layers\.(?P<i>\d+)\.downsample\.(?P<rest>(norm|reduction)\.\w+)", "encoder.stages.{i}.downsample.{rest}"),
        (r"backbone\.vssm\.outnorm(?P<i>\d+)\.(?P<rest>\w+)", "encoder.out_norms.{i}.{rest}"),
        (r"backbone\.cross_mamba\.(?P<i>\d+)\.channel_weights\.mlp\.0\.(?P<rest>\w+)", "crm.{i}.spatial_norm.{rest}"),
        (r"backbone\.cross_mamba\.(?P<i>\d+)\.channel_weights\.mlp\.1\.(?P<rest>\w+)", "crm.{i}.spatial_proj.{rest}"),
        (r"backbone\.cross_mamba\.(?P<i>\d+)\.channel_weights\.mlp\.3\." + _SCAN, "crm.{i}.channel_scan.{ssm}"),
        (r"backbone\.cross_mamba\.(?P<i>\d+)\.channel_weights\.mlp\.4\.(?P<rest>\w+)", "crm.{i}.norm.{rest}"),
        (r"backbone\.cross_mamba\.(?P<i>\d+)\.channel_weights\.mlp\.5\.(?P<rest>\w+)", "crm.{i}.head.{rest}"),
        (r"backbone\.region_patch\.(?P<i>\d+)\.inner_convs\.(?P<rest>\d+\.\w+)", "dcim.{i}.local_stem.{rest}"),
        (r"backbone\.region_patch\.(?P<i>\d+)\.outer_convs\.(?P<rest>\d+\.\w+)", "dcim.{i}.regional_stem.{rest}"),
        (r"backbone\.channel_attn_mamba\.(?P<i>\d+)\.outer_norm1\.(?P<rest>\w+)", "dcim.{i}.regional_norm.{rest}"),
        (r"backbone\.channel_attn_mamba\.(?P<i>\d+)\.outer_attn\." + _SCAN, "dcim.{i}.regional_ssm.{ssm}"),
        (r"backbone\.channel_attn_mamba\.(?P<i>\d+)\.inner_norm1\.(?P<rest>\w+)", "dcim.{i}.local_norm.{rest}"),
        (r"backbone\.channel_attn_mamba\.(?P<i>\d+)\.inner_attn\." + _SCAN, "dcim.{i}.local_ssm.{ssm}"),
        (r"decode_head\.layers_up\.0\.(?P<rest>(expand|norm)\.\w+)", "decoder.expand.{rest}"),
        (r"decode_head\.layers_up\.(?P<k>[123])\.blocks\.(?P<j>\d+)\.(?P<rest>norm1\.\w+|norm2\.\w+|scale1|scale2)", "decoder.stages.{k-1}.blocks.{j}.{rest}"),
        (r"decode_head\.layers_up\.(?P<k>[123])\.blocks\.(?P<j>\d+)\.op\." + _SCAN, "decoder.stages.{k-1}.blocks.{j}.ssm.{ssm}"),
        (r"decode_head\.layers_up\.(?P<k>[123])\.blocks\.(?P<j>\d+)\.conv_blk\.cab\.(?P<rest>[\w.]+)", "decoder.stages.{k-1}.blocks.{j}.cab.{rest}"),
        (r"decode_head\.layers_up\.(?P<k>[12])\.upsample\.(?P<rest>(linear|norm)\.\w+)", "decoder.stages.{k-1}.upsample.{rest}"),
        (r"decode_head\.norm_up\.(?P<rest>\w+)", "decoder.norm.{rest}"),
        (r"decode_head\.up\.(?P<rest>(linear1|linear2|norm)\.\w+)", "decoder.final_upsample.{rest}"),
        (r"decode_head\.output\.weight", "decoder.head.weight"),
    ]
]


def official_to_cipa_key(key: str) -> str | None:
    """Translate one official state_dict key to ours, or ``None`` if it is not an official CIPA key."""
    for pattern, template in _RULES:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        fields = {name: value for name, value in match.groupdict().items() if value is not None}
        if "ssm" in fields:
            head, _, tail = fields["ssm"].partition(".")
            fields["ssm"] = _SCAN_PARAMS.get(head, head) + (f".{tail}" if tail else "")
        if "k" in fields:
            fields["k-1"] = str(int(fields.pop("k")) - 1)
        return template.replace("{k-1}", fields.pop("k-1", "{k-1}")).format(**fields)
    return None


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official CIPA state_dict (``EncoderDecoder``) to :class:`~cipa_bundle.networks.CIPA` keys.

    A ``module.`` prefix left by DDP is removed. Values are passed through unchanged (same tensors).

    Raises:
        OfficialKeyError: a key is not part of the official model (listing up to 10 of them).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new_key = official_to_cipa_key(key.removeprefix("module."))
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise OfficialKeyError(
            f"{len(unknown)} state_dict keys are not official CIPA keys (expected 'backbone.*' / 'decode_head.*'), "
            f"e.g. {unknown[:10]}"
        )
    return converted


# VMamba's released ImageNet checkpoints predate the names used in CIPA's copy of VMamba.
_VMAMBA_RENAMES = [
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"\.ln_1\."), ".norm."),
    (re.compile(r"\.self_attention\."), ".op."),
]


def load_vmamba_pretrained(encoder: nn.Module, path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Load VMamba-T ImageNet weights (e.g. ``vssmtiny_dp01_ckpt_epoch_292.pth``) into a :class:`VMambaEncoder`.

    Keys are renamed as the official code does, then translated like official ``backbone.vssm.*`` keys. Classifier
    weights are reported as unexpected; the per-stage output norms, which ImageNet training lacks, as missing.
    Shapes must match (a mismatch is an error, not a silent skip).

    Returns:
        ``(missing, unexpected)`` key lists, also logged.
    """
    raw = state_dict_of(load_checkpoint(path), path)
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        renamed = key
        for pattern, replacement in _VMAMBA_RENAMES:
            renamed = pattern.sub(replacement, renamed)
        ours = official_to_cipa_key("backbone.vssm." + renamed)
        if ours is None:
            unexpected.append(key)
        else:
            mapped[ours.removeprefix("encoder.")] = value
    own = encoder.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise CipaInputError(f"{path}: VMamba weights do not fit this encoder width/depth: {wrong[:5]}")
    result = encoder.load_state_dict(mapped, strict=False)
    missing = list(result.missing_keys)
    unexpected += list(result.unexpected_keys)
    logger.info("loaded VMamba weights from %s: %d tensors, missing %s, unexpected %s", path, len(mapped), missing, unexpected)
    return missing, unexpected
