"""CIPA PET-CT lung tumour segmentation: a MONAI bundle and its Python package.

The package is laid out along the data path::

    io -> preprocessing -> networks -> (bundle configs) -> outputs

``networks`` knows nothing of DICOM and ``io`` knows nothing of torch models; the JSON configs in ``configs/``
wire them together.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
