"""A study on a DICOMweb server (a PACS such as Orthanc): find its series, fetch them, store results back.

All traffic goes through ``dicomweb-client`` (QIDO-RS to search, WADO-RS to retrieve, STOW-RS to store). This module
only turns a study address into those calls, keeps files whole, and turns every failure into a one-line
:class:`DicomWebError` that names the server URL and the study.

**Address.** ``dicomweb://HOST:PORT/PATH?study=STUDY_UID`` names a study on the DICOMweb service rooted at
``http://HOST:PORT/PATH`` (``dicomwebs://`` for HTTPS). Without ``?study=`` it names the server alone (the batch
verb). Plain ``http(s)://...`` is not taken as a study address, so a typo never turns a file path into a network call.

**Credentials** come from the environment, never the command line (where ``ps`` and shell history would show them):
``CIPA_DICOMWEB_TOKEN`` (sent as ``Authorization: Bearer``), or ``CIPA_DICOMWEB_USER`` and
``CIPA_DICOMWEB_PASSWORD`` (HTTP basic). With none set, requests go without credentials.

**Storing** is checked, not trusted: a STOW-RS answer can report success for an object that the server's own rules
then discard (Orthanc's ``ReceivedInstanceFilter`` does this). :func:`store_instances` therefore asks QIDO-RS for every
stored SOP Instance UID afterwards, and fails when one is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs

__all__ = [
    "DicomWebError",
    "DicomWebStudy",
    "SeriesRecord",
    "ENV_TOKEN",
    "ENV_USER",
    "ENV_PASSWORD",
    "is_dicomweb_url",
    "is_uid",
    "UID_FORM",
    "parse_dicomweb_url",
    "open_client",
    "study_series",
    "search_studies",
    "retrieve_series",
    "store_instances",
]

ENV_TOKEN = "CIPA_DICOMWEB_TOKEN"
ENV_USER = "CIPA_DICOMWEB_USER"
ENV_PASSWORD = "CIPA_DICOMWEB_PASSWORD"

_SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
_FORM = "dicomweb://HOST:PORT/PATH?study=STUDY_UID (dicomwebs:// for HTTPS)"
# DICOM JSON keys (PS3.18 F.2): QIDO-RS answers are keyed by tag.
_MODALITY = "00080060"
_SERIES_UID = "0020000E"
_SERIES_DESCRIPTION = "0008103E"
_STUDY_UID = "0020000D"
_SOP_UID = "00080018"
_INSTANCES_IN_SERIES = "00201209"
_FAILED_SOP_SEQUENCE = "FailedSOPSequence"
# A UID as it may name a folder: digits and dots only (PS3.5 9.1), at most 64 characters. Leading zeros, which the
# standard forbids but real archives hold, are let through: only path safety is checked here.
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
#: What :func:`is_uid` accepts, as the error messages say it.
UID_FORM = "digits and dots, at most 64 characters"
# Seconds to wait for the server to answer one request; a whole series streams within it per chunk.
_TIMEOUT = 60.0


class DicomWebError(CipaInputError):
    """A DICOMweb server that cannot be reached, refuses us, or lacks what the study needs."""


@dataclass(frozen=True)
class DicomWebStudy:
    """A DICOMweb service root and, for a study address, one StudyInstanceUID on it.

    Attributes:
        url: the service root that ``dicomweb-client`` takes, e.g. ``http://127.0.0.1:8042/dicom-web``.
        study_uid: the StudyInstanceUID, or ``None`` for a server address.
    """

    url: str
    study_uid: str | None = None

    def __str__(self) -> str:
        return self.url if self.study_uid is None else f"{self.url} study {self.study_uid}"

    def with_study(self, study_uid: str) -> DicomWebStudy:
        return DicomWebStudy(self.url, str(study_uid))


@dataclass(frozen=True)
class SeriesRecord:
    """One series of a study as QIDO-RS lists it."""

    uid: str
    modality: str
    description: str
    instances: int | None

    def describe(self) -> str:
        name = f" '{self.description}'" if self.description else ""
        count = "" if self.instances is None else f" ({self.instances} instances)"
        return f"{self.modality or '?'} series {self.uid}{name}{count}"


def is_dicomweb_url(text: Any) -> bool:
    """Whether ``text`` is a ``dicomweb://`` or ``dicomwebs://`` address (case-insensitive scheme)."""
    return isinstance(text, str) and text.split("://", 1)[0].lower() in _SCHEMES and "://" in text


def is_uid(text: Any) -> bool:
    """Whether ``text`` has the characters and length of a DICOM UID (so it is safe as a file or folder name)."""
    return isinstance(text, str) and len(text) <= 64 and _UID_PATTERN.fullmatch(text) is not None


def parse_dicomweb_url(address: str, require_study: bool = True) -> DicomWebStudy:
    """Split a ``dicomweb://`` address into the HTTP service root and the study.

    Args:
        address: ``dicomweb[s]://HOST[:PORT][/PATH][?study=STUDY_UID]``.
        require_study: refuse an address without ``?study=``.

    Raises:
        DicomWebError: another scheme, no host, unknown query keys, or (with ``require_study``) no study.
    """
    parts = urlsplit(address)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise DicomWebError(f"{address!r} is not a DICOMweb address; expected {_FORM}")
    if parts.username or parts.password:
        raise DicomWebError(
            f"{parts.scheme}://{parts.hostname}...: credentials in the address are refused (they would show in the "
            f"process list and shell history); set {ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN}"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"study"})
    if unknown:
        raise DicomWebError(f"{address}: unknown query key(s) {unknown}; expected {_FORM}")
    studies = query.get("study", [])
    if len(studies) > 1 or (studies and not studies[0].strip()):
        raise DicomWebError(f"{address}: expected one non-empty study=STUDY_UID; expected {_FORM}")
    url = urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    study = studies[0].strip() if studies else None
    if study is not None and not is_uid(study):
        raise DicomWebError(f"{address}: study={study!r} is not a StudyInstanceUID ({UID_FORM})")
    if require_study and study is None:
        raise DicomWebError(f"{address}: no study given; expected {_FORM}")
    return DicomWebStudy(url, study)


def open_client(url: str) -> Any:
    """A ``DICOMwebClient`` for the service root ``url``, with credentials from the environment (module docstring).

    Raises:
        DicomWebError: a user without a password or a password without a user.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    headers: dict[str, str] = {}
    token = os.environ.get(ENV_TOKEN)
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if (user is None) != (password is None):
        raise DicomWebError(f"{url}: {ENV_USER} and {ENV_PASSWORD} must be set together (only one of them is set)")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user is not None:
        session.auth = (user, password or "")
    return DICOMwebClient(url, session=session, headers=headers or None, timeout=_TIMEOUT)


@contextlib.contextmanager
def _server_errors(target: DicomWebStudy, doing: str) -> Iterator[None]:
    """Turn the ``requests`` failures of one exchange into a one-line :class:`DicomWebError`."""
    import requests

    try:
        yield
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        reason = err.response.reason if err.response is not None else str(err)
        if status in (401, 403):
            raise DicomWebError(
                f"{target}: authentication failed while {doing} (HTTP {status} {reason}); set {ENV_USER} and "
                f"{ENV_PASSWORD}, or {ENV_TOKEN}, to credentials the server accepts"
            ) from None
        raise DicomWebError(f"{target}: the server answered HTTP {status} {reason} while {doing}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        raise DicomWebError(f"{target}: server unreachable while {doing} ({type(err).__name__})") from None


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def study_series(client: Any, target: DicomWebStudy) -> list[SeriesRecord]:
    """Every series of the study (QIDO-RS ``/studies/{uid}/series``).

    Raises:
        DicomWebError: the server fails, or the study is not on it.
    """
    with _server_errors(target, "searching the study's series (QIDO-RS)"):
        found = client.search_for_series(study_instance_uid=target.study_uid, get_remaining=True)
    if not found:
        raise DicomWebError(f"{target}: study not found on the server (QIDO-RS lists no series for it)")
    records = []
    for item in found:
        uid = str(_value(item, _SERIES_UID))
        if not is_uid(uid):
            raise DicomWebError(f"{target}: the server lists a series with SeriesInstanceUID {uid!r}; expected "
                                f"{UID_FORM}")
        count = _value(item, _INSTANCES_IN_SERIES)
        records.append(SeriesRecord(uid, str(_value(item, _MODALITY) or ""),
                                    str(_value(item, _SERIES_DESCRIPTION) or "").strip(),
                                    None if count is None else int(count)))
    return records


def search_studies(client: Any, server: DicomWebStudy, study_date: str) -> list[str]:
    """StudyInstanceUIDs of the studies whose StudyDate falls in ``study_date`` (QIDO-RS).

    Args:
        study_date: a DICOM date or range, ``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``-YYYYMMDD`` or ``YYYYMMDD-``.
    """
    text = str(study_date).strip()
    bounds = text.split("-")
    if len(bounds) > 2 or not all(b == "" or (len(b) == 8 and b.isdigit()) for b in bounds) or not text.strip("-"):
        raise DicomWebError(f"{server}: study date {study_date!r}; expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    with _server_errors(server, f"searching studies of {text} (QIDO-RS)"):
        found = client.search_for_studies(search_filters={"StudyDate": text}, get_remaining=True)
    uids = sorted({str(_value(item, _STUDY_UID)) for item in found if _value(item, _STUDY_UID)})
    bad = [uid for uid in uids if not is_uid(uid)]
    if bad:
        raise DicomWebError(f"{server}: the server lists StudyInstanceUID {bad[0]!r} for {text}; expected {UID_FORM}")
    return uids


def retrieve_series(client: Any, target: DicomWebStudy, series_uid: str, folder: str | os.PathLike[str]) -> list[Path]:
    """Fetch one series (WADO-RS, in its stored transfer syntax) into ``folder/<SOPInstanceUID>.dcm``.

    Each file is written all-or-nothing (:func:`~cipa_bundle.io.atomic.atomic_outputs`), so an interrupted transfer
    leaves no file that looks whole.

    Returns:
        The files written, in the order the server sent them.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # "*" asks for the transfer syntax the server holds: no lossy transcoding on the way, and JPEG Lossless or
    # JPEG 2000 pixel data are decoded by the same reader as a folder study's.
    with _server_errors(target, f"retrieving series {series_uid} (WADO-RS)"):
        for ds in client.iter_series(target.study_uid, series_uid, media_types=(("application/dicom", "*"),)):
            if not is_uid(str(ds.SOPInstanceUID)):
                raise DicomWebError(f"{target}: series {series_uid} holds an instance with SOPInstanceUID "
                                    f"{ds.SOPInstanceUID!r}; expected {UID_FORM}")
            final = out / f"{ds.SOPInstanceUID}.dcm"
            with atomic_outputs([final]) as (temp,):
                ds.save_as(temp, enforce_file_format=True)
            written.append(final)
    if not written:
        raise DicomWebError(f"{target}: series {series_uid} returned no instances (WADO-RS)")
    return written


def store_instances(client: Any, target: DicomWebStudy, paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Store DICOM files into the study (STOW-RS) and confirm with QIDO-RS that the server kept each of them.

    Returns:
        The SOP Instance UIDs stored.

    Raises:
        DicomWebError: a file of another study, a server that refuses (its HTTP status, or the Failed SOP Sequence
            of its answer), or an object missing from the study afterwards.
    """
    import pydicom

    datasets = [pydicom.dcmread(os.fspath(p)) for p in paths]
    for path, ds in zip(paths, datasets):
        if str(ds.StudyInstanceUID) != target.study_uid:
            raise DicomWebError(f"{target}: {path} belongs to study {ds.StudyInstanceUID}; expected this study")
    names = ", ".join(Path(p).name for p in paths)
    with _server_errors(target, f"storing {names} (STOW-RS)"):
        answer = client.store_instances(datasets, study_instance_uid=target.study_uid)
    failed = [str(item.get("ReferencedSOPInstanceUID", "?")) + f" (FailureReason {item.get('FailureReason', '?')})"
              for item in answer.get(_FAILED_SOP_SEQUENCE, [])]
    if failed:
        raise DicomWebError(f"{target}: the server refused {names} (STOW-RS Failed SOP Sequence: {', '.join(failed)})")
    stored = [str(ds.SOPInstanceUID) for ds in datasets]
    missing = []
    for path, ds in zip(paths, datasets):
        with _server_errors(target, f"confirming {Path(path).name} (QIDO-RS)"):
            listed = client.search_for_instances(
                study_instance_uid=target.study_uid, series_instance_uid=str(ds.SeriesInstanceUID),
                search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)},
            )
        if str(ds.SOPInstanceUID) not in {str(_value(item, _SOP_UID)) for item in listed}:
            missing.append(Path(path).name)
    if missing:
        raise DicomWebError(
            f"{target}: the server answered STOW-RS without an error but does not list {', '.join(missing)} in the "
            "study afterwards (QIDO-RS): it discarded the object (a server-side filter or policy)"
        )
    return stored
