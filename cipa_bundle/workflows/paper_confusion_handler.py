"""The ignite handler of :class:`~cipa_bundle.metrics.PaperConfusionMetric`, as ``monai.handlers.MeanDice`` is the
handler of ``DiceMetric``: one short block per metric in the bundle configs::

    "key_metric": {"val_iou": {"_target_": "cipa_bundle.workflows.PaperConfusion", "metric": "iou"}}
"""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers import IgniteMetricHandler, from_engine

from cipa_bundle.metrics import DEFAULT_THRESHOLD, PaperConfusionMetric

__all__ = ["PaperConfusion"]


class PaperConfusion(IgniteMetricHandler):
    """Dataset-level IoU / Dice / balanced accuracy of the paper, pooled over every pixel an engine run has seen.

    Args:
        metric: ``"iou"``, ``"dice"`` (= F1) or ``"acc"`` (balanced accuracy), see
            :class:`~cipa_bundle.metrics.PaperConfusionMetric`.
        threshold: foreground is ``value >= threshold``. Pass sigmoid probabilities or binary masks, not logits.
        output_transform: builds ``(y_pred, y)`` from ``engine.state.output``. The default reads the ``pred`` and
            ``label`` keys of a ``SupervisedTrainer`` / ``SupervisedEvaluator`` output (a dict, or the list of
            per-sample dicts after decollation), giving batch-first ``(B, 1, H, W)`` tensors or lists of
            ``(1, H, W)`` tensors; pass ``lambda x: x`` for an engine whose output already is ``(y_pred, y)``.
        save_details: keep the per-sample ``[TP, FP, FN, TN]`` counts in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        metric: str = "iou",
        threshold: float = DEFAULT_THRESHOLD,
        output_transform: Callable = from_engine(["pred", "label"]),
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=PaperConfusionMetric(metric, threshold),
            output_transform=output_transform,
            save_details=save_details,
        )
