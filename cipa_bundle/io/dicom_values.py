"""Lenient readers for DICOM header values: text, numbers, DA/TM/DT, and private elements through their creator.

They never raise. A missing, empty or unparsable value reads as ``None`` (``""`` for text), so that the caller, which
knows which tag it needed and why, can word the error. Legacy forms that real scanners still write are accepted: TM
``HH:MM:SS`` and DA ``YYYY.MM.DD``. Malformed values that pydicom cannot convert are read from their raw bytes.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from pydicom.dataset import Dataset

__all__ = ["dicom_number", "dicom_text", "element_value", "parse_da", "parse_dt", "parse_tm", "private_value"]

_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DT_RE = re.compile(r"^(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$")


def dicom_text(value: Any) -> str:
    """A DICOM value as stripped text ('' for None); multi-values joined with a backslash."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip(" \x00")
    return str(value).strip(" \x00")


def parse_tm(text: str) -> _dt.time | None:
    """DICOM TM (``HH[MM[SS[.F]]]``, or the old ``HH:MM:SS``) to a time; ``None`` if unparsable."""
    m = _TM_RE.match(text.replace(":", ""))
    if not m:
        return None
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    micro = int((m.group(4) or "0").ljust(6, "0"))
    if hh > 23 or mm > 59 or ss > 59:
        return None
    return _dt.time(hh, mm, ss, micro)


def parse_da(text: str) -> _dt.date | None:
    """DICOM DA (``YYYYMMDD``, or the old ``YYYY.MM.DD``) to a date; ``None`` if unparsable."""
    m = _DA_RE.match(text.replace(".", "") if len(text) == 10 else text)
    if not m:
        return None
    try:
        return _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def parse_dt(text: str) -> tuple[_dt.datetime | None, str | None]:
    """DICOM DT with at least the hour to ``(naive datetime, UTC-offset text or None)``; ``(None, None)`` if bad."""
    m = _DT_RE.match(text)
    if not m or not m.group(2):
        return None, None
    date = parse_da(m.group(1))
    time = parse_tm(m.group(2))
    if date is None or time is None:
        return None, None
    return _dt.datetime.combine(date, time), m.group(3)


def dicom_number(value: Any) -> float | None:
    """A DS/IS value (or private bytes) as float; ``None`` when missing, empty or unparsable."""
    text = dicom_text(value)
    if not text or "\\" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def element_value(ds: Dataset, keyword: str) -> Any:
    """``ds.keyword`` or ``None`` (also for elements pydicom cannot convert)."""
    try:
        return ds.get(keyword)
    except Exception:  # a malformed value can fail to convert on access: fall back to its raw bytes
        try:
            raw = ds.get_item(keyword)
        except Exception:
            return None
        return None if raw is None else getattr(raw, "value", None)


def private_value(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """A private element's value found through its private creator (never a fixed element number)."""
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        return None
    try:
        elem = block[offset]
    except KeyError:
        return None
    return elem.value
