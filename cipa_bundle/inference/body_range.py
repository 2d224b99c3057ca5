"""The body-range slice inferer, the base of :class:`~cipa_bundle.inference.lung_range.LungSliceInferer` (the
workflow's ``inferer``, which keeps to the body range alone with ``--all_slices``).

:class:`BodySliceInferer` is MONAI's ``SliceInferer`` that only runs the network on the
axial slices between the first and the last slice containing body (plus a margin). Slices outside that range, e.g.
the air above the head or below the feet of a CT that extends past the patient, get a ``background_logit`` whose
sigmoid is 0, so they are always background and cost nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SliceInferer
from monai.utils import convert_to_dst_type

from cipa_bundle.inference.postprocess import DEFAULT_BODY_THRESHOLD
from cipa_bundle.preprocessing.transforms import NormalizeCIPAInput

__all__ = ["BodySliceInferer"]


class BodySliceInferer(SliceInferer):
    """``SliceInferer`` that skips the axial slices outside the body's head-foot range.

    A slice "contains body" when any voxel of its CT channel exceeds ``body_threshold``. The network runs on the
    contiguous range from the first to the last such slice, widened by ``margin`` slices on each side (a lesion is
    never outside the body, but its boundary slice may hold little tissue); the other slices receive
    ``background_logit``. If no slice contains body, every slice is run: nothing is skipped on a guess.

    Units: ``body_threshold`` is in windowed-CT units ([0, 1], 0.5 = -700 HU with the default window, the same
    value the post-processing's body mask uses); the inferer sees network inputs, so it maps the threshold through
    :class:`~cipa_bundle.preprocessing.transforms.NormalizeCIPAInput`. The default ``cval`` (padding of slices
    smaller than ``roi_size``) is likewise that transform applied to 0: padding looks like air and zero uptake.

    Args:
        roi_size: the network's ``(H, W)`` input size.
        sw_batch_size: slices per network call.
        spatial_dim: the axial axis among the three spatial axes of the ``(B, C, X, Y, Z)`` input (2 after
            ``Orientationd("PLS")``).
        body_channel: the CT channel of the input.
        body_threshold: see above.
        margin: slices added on each side of the body range.
        background_logit: logit written for skipped slices (sigmoid(-1e4) is exactly 0 in float32).
        cval: padding value; ``None`` = normalised 0.
        kwargs: other ``SlidingWindowInferer`` arguments (``overlap``, ``mode``, ``progress``, ``device``...).

    After each call, :attr:`last_stats` holds ``{"slices", "slices_run", "network_s", "selection"}``
    (``selection``: ``"body"``, or ``"all"`` when every slice ran). Subclasses choose other ranges by overriding
    :meth:`slice_range` (:class:`~cipa_bundle.inference.lung_range.LungSliceInferer`).
    """
    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        spatial_dim: int = 2,
        body_channel: int = 0,
        body_threshold: float = DEFAULT_BODY_THRESHOLD,
        margin: int = 1,
        background_logit: float = -1e4,
        cval: float | None = None,
        **kwargs: Any,
    ) -> None:
        normalize = NormalizeCIPAInput()
        if cval is None:
            cval = float(normalize(torch.zeros(1))[0])
        super().__init__(spatial_dim, roi_size=roi_size, sw_batch_size=sw_batch_size, cval=cval, **kwargs)
        if margin < 0:
            raise ValueError(f"BodySliceInferer: margin must be >= 0, got {margin}")
        self.body_channel = int(body_channel)
        self.body_threshold = float(body_threshold)
        self.network_threshold = float(normalize(torch.tensor([float(body_threshold)]))[0])
        self.margin = int(margin)
        self.background_logit = float(background_logit)
        self.last_stats: dict[str, Any] = {}
        self.selection: dict[str, Any] = {}

    def body_range(self, inputs: torch.Tensor) -> tuple[int, int]:
        """``(first, stop)`` of the slices to run along the axial axis of ``(B, C, X, Y, Z)`` ``inputs``."""
        axis = self.spatial_dim + 2
        n = int(inputs.shape[axis])
        ct = inputs[:, self.body_channel : self.body_channel + 1]
        other = tuple(d for d in range(inputs.ndim) if d != axis)
        has_body = torch.amax((ct > self.network_threshold).to(torch.uint8), dim=other)
        hits = torch.nonzero(has_body).flatten()
        if hits.numel() == 0:
            return 0, n
        return max(int(hits[0]) - self.margin, 0), min(int(hits[-1]) + 1 + self.margin, n)

    def slice_range(self, inputs: torch.Tensor) -> tuple[int, int]:
        """``(first, stop)`` of the slices the network runs on; sets :attr:`selection` to say how it was chosen."""
        first, stop = self.body_range(inputs)
        every = (first, stop) == (0, int(inputs.shape[self.spatial_dim + 2]))
        self.selection = {"selection": "all" if every else "body"}
        return first, stop

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        axis = self.spatial_dim + 2
        n = int(inputs.shape[axis])
        first, stop = self.slice_range(inputs)
        start = time.perf_counter()
        if (first, stop) == (0, n):
            out = super().__call__(inputs, network, *args, **kwargs)
        else:
            part = super().__call__(inputs.narrow(axis, first, stop - first), network, *args, **kwargs)
            if not isinstance(part, torch.Tensor):  # multi-output networks: fall back to the plain inferer
                out = super().__call__(inputs, network, *args, **kwargs)
                first, stop = 0, n
                self.selection = {"selection": "all"}
            else:
                part_t = part.as_tensor() if hasattr(part, "as_tensor") else part
                shape = list(part_t.shape)
                shape[axis] = n
                full = torch.full(shape, self.background_logit, dtype=part_t.dtype, device=part_t.device)
                full.narrow(axis, first, stop - first).copy_(part_t)
                out = convert_to_dst_type(full, inputs, dtype=full.dtype, device=full.device)[0]
        self.last_stats = {"slices": n, "slices_run": stop - first, "network_s": time.perf_counter() - start,
                           **self.selection}
        return out  # type: ignore[return-value]
