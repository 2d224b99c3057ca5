"""Inference: from a PET-CT study to a tumour mask, a DICOM SEG, figures and a report (``cipa-bundle predict``).

Modules, in the order a study travels through them:

* :mod:`~cipa_bundle.inference.inputs`: DICOM study, CT + PET NIfTI pair or fused image -> the fused
  ``image.nii.gz`` the bundle reads (:func:`~cipa_bundle.inference.inputs.prepare_input`).
* ``configs/inference.json``: the MONAI bundle workflow (orientation, normalisation, slice-wise inference with
  :class:`~cipa_bundle.inference.lung_range.LungSliceInferer`, sigmoid, inversion, threshold, post-processing, save).
* :mod:`~cipa_bundle.inference.body_range` and :mod:`~cipa_bundle.inference.lung_range`: the slice inferers that run
  the network only on the body's, or the lungs', axial range.
* :mod:`~cipa_bundle.inference.postprocess`: body mask and removal of small / outside-body components.
* :mod:`~cipa_bundle.inference.outputs`: the atomic mask saver and the SEG / figures / report writer.
* :mod:`~cipa_bundle.inference.threshold`: the training-free SUV threshold baselines.
* :mod:`~cipa_bundle.inference.pacs`: the DICOMweb loop around ``predict``.
* :mod:`~cipa_bundle.inference.predict`: :func:`~cipa_bundle.inference.predict.predict`, which runs all of the above.

Submodules are imported on use (``from cipa_bundle.inference.predict import predict``), so importing this package
costs nothing.
"""

from __future__ import annotations

__all__: list[str] = []
