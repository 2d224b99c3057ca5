"""Error classes shared by the whole package.

Every error raised for bad *input* (a file, a DICOM tag, a config key) derives from :class:`CipaInputError`, so the
CLI can turn it into a one-line message and exit code 2, while programming errors still show a traceback.
Messages name the file, the tag or key, the value found and what was expected.
"""

from __future__ import annotations

__all__ = ["CipaInputError"]


class CipaInputError(ValueError):
    """Input data or arguments that the pipeline refuses to process."""
