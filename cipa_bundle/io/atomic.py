"""All-or-nothing file output: a set of files is either completely written or absent, never half-written.

Files are built under temporary names in the *same* folders as their final paths, so each final rename is a
same-filesystem ``os.replace`` (atomic on POSIX and Windows), and temporaries are removed on any failure. Every
writer of the project (NIfTI, JSON, DICOM SEG, PNG, CSV, checkpoints) goes through :func:`atomic_outputs`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["atomic_outputs"]


def _temp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` (matches the repository's ``*.nii.gz.tmp*`` ignore pattern)."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Write several files all-or-nothing.

    Yields temporary paths (same folders as ``paths``) to write to. On normal exit every temporary is renamed onto its
    final path; on an exception inside the block the temporaries are deleted and no final file is touched. If a rename
    itself fails, the finals renamed so far are removed again, so a partial set never remains.

    Args:
        paths: the final output paths; their parent folders are created.

    Yields:
        The temporary paths, in the same order.
    """
    finals = [Path(p) for p in paths]
    temps = [_temp_name(p) for p in finals]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    try:
        yield temps
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
            done.append(final)
    except BaseException:
        for path in temps + done:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
