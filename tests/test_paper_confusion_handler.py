"""``cipa_bundle.workflows.PaperConfusion``: the ignite handler that the bundle configs use for IoU, Dice and Acc."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from cipa_bundle.metrics import PaperConfusionMetric
from cipa_bundle.workflows import PaperConfusion
from tests.conftest import REPO_ROOT


def _sample(pred_rows: list[tuple[int, int]], gt_row: int) -> dict[str, torch.Tensor]:
    """One decollated ``SupervisedEvaluator`` output item: ``(1, 4, 4)`` pred and label, tumour in ``gt_row``."""
    pred, label = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    for r, c in pred_rows:
        pred[0, r, c] = 1.0
    label[0, gt_row, :] = 1.0
    return {"pred": pred, "label": label}


def test_handler_pools_decollated_engine_outputs_like_the_paper():
    # Two iterations, as SupervisedEvaluator leaves them in engine.state.output: lists of per-sample dicts.
    batches = [
        [_sample([(0, 0), (0, 1)], gt_row=0)],  # 4 tumour pixels, 2 found
        # 4 found and 1 false alarm; then 4 missed
        [_sample([(0, 0), (0, 1), (0, 2), (0, 3), (3, 3)], gt_row=0), _sample([], gt_row=2)],
    ]
    engine = Engine(lambda e, batch: batch)
    for name, metric in (("val_iou", "iou"), ("val_dice", "dice"), ("val_acc", "acc")):
        PaperConfusion(metric).attach(engine, name)
    engine.run(batches, max_epochs=1)
    # pooled over 3 images of 16 pixels: TP 6, FP 1, FN 2 + 4 = 6, TN 48 - 13 = 35
    assert engine.state.metrics["val_iou"] == pytest.approx(6 / 13)
    assert engine.state.metrics["val_dice"] == pytest.approx(12 / 19)
    assert engine.state.metrics["val_acc"] == pytest.approx((6 / 12 + 35 / 36) / 2)
    details = engine.state.metric_details["val_iou"]
    assert torch.as_tensor(details).reshape(-1, 4).sum(0).tolist() == [6, 1, 6, 35]


def test_handler_takes_an_output_transform_and_threshold():
    pred = torch.tensor([[[[0.4, 0.6], [0.0, 0.0]]]])  # only 0.6 is foreground at 0.5; both at 0.3
    label = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    for threshold, expected in ((0.5, 1 / 2), (0.3, 1.0)):
        engine = Engine(lambda e, batch: batch)
        PaperConfusion("iou", threshold=threshold, output_transform=lambda x: x).attach(engine, "iou")
        engine.run([(pred, label)], max_epochs=1)
        assert engine.state.metrics["iou"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="'iou', 'dice' or 'acc'"):
        PaperConfusion("miou")


def test_train_config_metrics_are_paper_confusion_handlers():
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    found = {
        **parser.get_parsed_content("train#key_metric"),
        **parser.get_parsed_content("validate#key_metric"),
        **parser.get_parsed_content("validate#additional_metrics"),
    }
    assert {name: (type(h), type(h.metric_fn), h.metric_fn.metric) for name, h in found.items()} == {
        "train_iou": (PaperConfusion, PaperConfusionMetric, "iou"),
        "val_iou": (PaperConfusion, PaperConfusionMetric, "iou"),
        "val_dice": (PaperConfusion, PaperConfusionMetric, "dice"),
        "val_acc": (PaperConfusion, PaperConfusionMetric, "acc"),
    }
