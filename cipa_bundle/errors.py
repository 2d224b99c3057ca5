"""Error classes shared by the whole package.

Every error raised for bad *input* (a file, a DICOM tag, a config key) derives from :class:`CipaInputError`, so the
CLI can turn it into a one-line message and exit code 2, while programming errors still show a traceback.
Messages name the file, the tag or key, the value found and what was expected.
"""

from __future__ import annotations

__all__ = ["CipaInputError", "input_error_in"]


class CipaInputError(ValueError):
    """Input data or arguments that the pipeline refuses to process."""


def input_error_in(err: BaseException) -> CipaInputError | None:
    """The :class:`CipaInputError` that ``err`` is or wraps, or None.

    MONAI's config parser re-raises errors of the components and expressions it evaluates as ``RuntimeError``
    (``raise ... from``), and the user should see the input error, not the wrapper.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, CipaInputError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
