"""CIPA network: size, official-key mapping, golden fixture, input validation, trainability, config instantiation."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

from cipa_bundle.networks import CIPA, convert_official_state_dict, load_vmamba_pretrained, param_groups
from cipa_bundle.networks.official_keys import OfficialKeyError

#: A configuration small enough for many CPU passes per second; dims >= 30 because the decoder's channel attention
#: squeezes C // 30 channels.
TINY = dict(img_size=128, dims=30, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1))


def _official_table(reference) -> dict[str, tuple[int, ...]]:
    rows = [line.rstrip("\n").split("\t") for line in open(reference / "cipa_official_state_dict.tsv") if not line.startswith("#")]
    return {key: tuple(json.loads(shape)) for key, shape, _ in rows}


def test_default_model_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = CIPA()
    assert sum(p.numel() for p in model.parameters()) == 54_572_198


def test_official_keys_map_one_to_one_with_equal_shapes(shared_reference):
    table = _official_table(shared_reference)
    assert len(table) == 848
    converted = convert_official_state_dict({k: torch.empty(s, device="meta") for k, s in table.items()})
    with torch.device("meta"):
        own = CIPA().state_dict()
    assert len(converted) == len(table)  # injective: no two official keys land on one of ours
    assert set(converted) == set(own)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}


def test_unknown_official_key_is_named():
    with pytest.raises(OfficialKeyError, match="backbone.not_a_layer.weight"):
        convert_official_state_dict({"backbone.not_a_layer.weight": torch.zeros(1)})


def _stage_reductions(tensor: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """The fixture's three exact reductions of a (2, C, H, W) map: corner crop, 8x8 average pool, channel means."""
    kernel = tensor.shape[-1] // 8
    return {
        f"{name}_crop": tensor[:, :, :8, :8],
        f"{name}_pool": torch.nn.functional.avg_pool2d(tensor, kernel),
        f"{name}_chmean": tensor.mean((2, 3)),
    }


def test_golden_fixture_float64(shared_reference):
    golden = torch.load(shared_reference / "cipa_golden_small.pt", weights_only=True)
    cfg = golden["config"]
    model = CIPA(
        img_size=cfg["input_hw"],
        dims=cfg["backbone"]["channels"],
        depths=cfg["backbone"]["depths"],
        decoder_depths=cfg["decoder"]["depths"],
    )
    model.load_state_dict(convert_official_state_dict(golden["state_dict"]), strict=True)
    model = model.double().eval()

    captured: dict[str, object] = {}
    model.encoder.register_forward_hook(lambda m, a, out: captured.__setitem__("encoder", out))
    model.crm[0].register_forward_hook(lambda m, a, out: captured.__setitem__("crm0", out))
    model.dcim[0].register_forward_hook(lambda m, a, out: captured.__setitem__("dcim0", out))
    model.decoder.register_forward_pre_hook(lambda m, args: captured.__setitem__("fused", args[0]))

    # Our convention is one (B, 2, H, W) tensor [CT, PET]; the official call is model(ct_3ch, pet_3ch).
    image = torch.cat([golden["ct"], golden["pet"]], dim=1).double()
    with torch.no_grad():
        logits = model(image)
    assert (logits - golden["logits"]).abs().max().item() <= 1e-10

    batch = image.shape[0]
    ours: dict[str, torch.Tensor] = {}
    for i, (features, fused) in enumerate(zip(captured["encoder"], captured["fused"])):
        ours.update(_stage_reductions(features[:batch], f"enc_ct_{i}"))
        ours[f"enc_pet_{i}_chmean"] = features[batch:].mean((2, 3))
        ours.update(_stage_reductions(fused, f"fused_{i}"))
    ours.update(_stage_reductions(captured["crm0"][0], "crm0_ct"))
    ours.update(_stage_reductions(captured["crm0"][1], "crm0_pet"))
    ours.update(_stage_reductions(captured["dcim0"], "dcim0"))
    assert set(ours) == {k for k in golden if k.startswith(("enc_", "crm0_", "dcim0_", "fused_"))}  # all 37 stored
    errors = {name: (value - golden[name]).abs().max().item() for name, value in ours.items()}
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.parametrize(
    "shape, message",
    [((1, 3, 128, 128), r"\(B, 2, 128, 128\)"), ((1, 2, 64, 64), r"\(B, 2, 128, 128\)"), ((2, 128, 128), "channel 0 = CT")],
)
def test_wrong_input_shape_names_the_expected_one(shape, message):
    model = CIPA(**TINY)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_img_size_must_be_a_multiple_of_128():
    with pytest.raises(ValueError, match="multiples of 128"):
        CIPA(img_size=96)


def test_output_shape_and_non_square_input():
    model = CIPA(**{**TINY, "img_size": (128, 256)}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 128, 256))
    assert out.shape == (2, 1, 128, 256)
    assert torch.isfinite(out).all()


def test_modalities_are_not_interchangeable():
    """Channel 0 feeds the CT path (local windows), channel 1 the PET path (regional tokens)."""
    torch.manual_seed(0)
    model = CIPA(**TINY).eval()
    x = torch.randn(1, 2, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.flip(1)))


def test_every_parameter_gets_a_finite_nonzero_gradient_and_reaches_the_optimizer():
    torch.manual_seed(0)
    # 128 x 256: at 128 x 128 the stage-3 DCIM region grid is 1 x 1, a length-1 scan in which A (decay) has no
    # effect, so A_log there would rightly get a zero gradient.
    model = CIPA(**{**TINY, "img_size": (128, 256)}).train()
    x = torch.randn(2, 2, 128, 256)
    target = (torch.rand(2, 1, 128, 256) > 0.7).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0]
    assert bad == []

    groups = param_groups(model, weight_decay=0.01)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert {"encoder.stages.0.blocks.0.ssm.core.A_log", "encoder.stages.0.blocks.0.ssm.core.D",
            "encoder.stages.0.blocks.0.ssm.core.dt_proj_bias", "encoder.stages.0.blocks.0.norm.weight",
            "decoder.stages.0.blocks.0.scale1", "dcim.0.local_stem.1.weight", "crm.0.head.bias"} <= exempt
    assert {"encoder.stages.0.blocks.0.ssm.core.x_proj_weight", "encoder.stages.0.blocks.0.ssm.in_proj.weight",
            "decoder.head.weight", "dcim.0.local_stem.0.weight"} <= decayed
    torch.optim.AdamW(groups, lr=6e-5).step()


def _loss_gradients_and_saved_bytes(use_checkpoint: bool) -> tuple[torch.Tensor, dict, dict, int]:
    """One float64 training step of a small CIPA with stochastic depth on: loss, every gradient, the batch-norm
    buffers after the step, and the bytes autograd kept for the backward pass outside checkpointed regions."""
    torch.manual_seed(0)
    config = {**TINY, "depths": (1, 2, 1, 1), "drop_path_rate": 0.3, "decoder_drop_path_rate": 0.3}
    model = CIPA(**config, use_checkpoint=use_checkpoint).double().train()
    x = torch.randn(2, 2, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = (torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(2)) > 0.7).double()
    saved = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(3)  # the DropPath masks
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.detach(), grads, buffers, sum(saved)


def test_activation_checkpointing_computes_the_same_loss_gradients_and_statistics_in_float64():
    loss, grads, buffers, kept = _loss_gradients_and_saved_bytes(use_checkpoint=False)
    loss_ckpt, grads_ckpt, buffers_ckpt, kept_ckpt = _loss_gradients_and_saved_bytes(use_checkpoint=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    assert grads_ckpt.keys() == grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    # DCIM's batch norms were updated once per step, not once more by the recomputation.
    assert any("running_mean" in name for name in buffers)
    for name, buffer in buffers.items():
        torch.testing.assert_close(buffers_ckpt[name], buffer, rtol=0, atol=0, msg=name)
    # And it does save memory: most activations are no longer kept for the backward pass.
    assert kept_ckpt < 0.25 * kept, (kept_ckpt, kept)


def test_activation_checkpointing_changes_neither_inference_nor_the_state_dict():
    torch.manual_seed(0)
    plain = CIPA(**TINY).eval()
    checkpointed = CIPA(**TINY, use_checkpoint=True).eval()
    checkpointed.load_state_dict(plain.state_dict())  # same keys: the flag adds no parameters or buffers
    x = torch.randn(1, 2, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(x), plain(x), rtol=0, atol=0)


def test_instantiable_from_a_bundle_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"network_def": {"_target_": "cipa_bundle.networks.CIPA", "img_size": 128, "dims": 30,
                                           "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1]}})
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, CIPA) and network.img_size == (128, 128)


def test_scan_initialisation_follows_mamba():
    core = CIPA(**TINY).encoder.stages[0].blocks[0].ssm.core
    assert torch.allclose(core.A_log[0], torch.log(torch.arange(1.0, 17.0)))
    dt = torch.nn.functional.softplus(core.dt_proj_bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert core.dt_rank == math.ceil(30 / 16)


def _official_from_ours(state: dict[str, torch.Tensor], reference) -> dict[str, torch.Tensor]:
    """Invert the converter through the official key table (it is a bijection)."""
    table = _official_table(reference)
    ours_of = convert_official_state_dict({k: torch.empty(0) for k in table})
    official_of = dict(zip(ours_of.keys(), table.keys()))
    return {official_of[k]: v for k, v in state.items()}


def test_import_official_cli_round_trip(tmp_path, shared_reference):
    from cipa_bundle.cli import main

    torch.manual_seed(0)
    state = CIPA().state_dict()
    checkpoint = {"model": _official_from_ours(state, shared_reference), "epoch": 7, "args": argparse.Namespace(lr=6e-5)}
    torch.save(checkpoint, tmp_path / "CIPA.pth")
    main(["import-official", str(tmp_path / "CIPA.pth"), str(tmp_path / "model.pt")])
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CIPA.pth", "model.pt"]  # no temporary file left


def test_import_official_rejects_a_foreign_checkpoint(tmp_path):
    from cipa_bundle.cli import main

    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(["import-official", str(tmp_path / "other.pth"), str(tmp_path / "model.pt")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "model.pt").exists()


def test_vmamba_imagenet_weights_load_into_the_encoder(tmp_path):
    torch.manual_seed(1)
    donor = CIPA(**TINY).encoder
    imagenet_keys = {}
    for key, value in donor.state_dict().items():
        if key.startswith("out_norms."):
            continue  # ImageNet training has no per-stage output norms
        key = re.sub(r"(blocks\.\d+)\.norm\.", r"\1.ln_1.", key)
        key = (key.replace("patch_embed.", "patch_embed.proj.").replace("patch_norm.", "patch_embed.norm.")
               .replace("stages.", "layers.").replace(".ssm.", ".self_attention.")
               .replace("core.x_proj_weight", "x_proj_weight").replace("core.dt_proj_weight", "dt_projs_weight")
               .replace("core.dt_proj_bias", "dt_projs_bias").replace("core.A_log", "A_logs").replace("core.D", "Ds")
               .replace(".conv.", ".conv2d."))
        imagenet_keys[key] = value.clone()
    imagenet_keys["classifier.head.weight"] = torch.zeros(1000, 240)
    torch.save({"model": imagenet_keys, "epoch": 292}, tmp_path / "vssm_tiny.pth")

    receiver = CIPA(**TINY).encoder
    missing, unexpected = load_vmamba_pretrained(receiver, tmp_path / "vssm_tiny.pth")
    assert unexpected == ["classifier.head.weight"]
    assert sorted(missing) == sorted(k for k in receiver.state_dict() if k.startswith("out_norms."))
    donor_state, receiver_state = donor.state_dict(), receiver.state_dict()
    assert all(torch.equal(donor_state[k], receiver_state[k]) for k in donor_state if not k.startswith("out_norms."))


def test_cli_help_lists_the_verbs_and_argument_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path) -> None:
    from cipa_bundle.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    captured = capsys.readouterr()
    listed = captured.out + captured.err
    for verb in ("convert", "predict", "demo", "summary", "import_official", "package", "evaluate"):
        assert f"\n     {verb}\n" in listed, verb
    # The network's own check of a bad size, as the user's argument error: one line, exit code 2.
    with pytest.raises(SystemExit) as info:
        main(["summary", "--img_size", "100"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cipa-bundle: error: summary: img_size must be one or two positive multiples of 128, got 100"]
    # An input error raised inside a MONAI config component arrives wrapped in MONAI's RuntimeError.
    with pytest.raises(SystemExit) as info:
        main(["demo", "--cases", "1", "--out_dir", str(tmp_path / "demo")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cipa-bundle: error: synthetic dataset: cases=1; expected at least 3 (train, val, test)"
