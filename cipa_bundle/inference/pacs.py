"""``predict`` with a PACS at both ends: a study fetched from a DICOMweb server, its DICOM SEG stored back.

Two entry points, both thin layers over :func:`~cipa_bundle.inference.predict.predict`, so a PACS study meets exactly
the checks, series rules and outputs of a folder study:

* :func:`predict_dicomweb` - one study. QIDO-RS lists the study's series; every CT and PET series is fetched
  (WADO-RS) into a temporary folder, or only the ones named by ``ct_series`` / ``pet_series``; the folder rules of
  :func:`~cipa_bundle.preprocessing.convert.find_study_series` then set aside localizers and non-attenuation-corrected
  PET, or refuse an ambiguous study. With ``store=True`` the SEG (and the RTSTRUCT) go back into the same study through
  STOW-RS, and QIDO-RS must list them afterwards.
* :func:`predict_studies` - a batch, as nnU-Net's ``predict`` runs over a folder: studies from a file of UIDs or a
  QIDO-RS date range, one after another. A study that fails is recorded and the batch goes on. ``manifest.json``
  (rewritten atomically after every study) remembers what is done, so a re-run skips it; ``summary.csv`` has one
  row per study.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cipa_bundle.errors import CipaInputError
from cipa_bundle.inference.predict import predict
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.dicomweb import (
    DicomWebError,
    UID_FORM,
    DicomWebStudy,
    is_uid,
    open_client,
    parse_dicomweb_url,
    retrieve_series,
    search_studies,
    store_instances,
    study_series,
)
from cipa_bundle.io.nifti import save_json

__all__ = ["DicomWebPrediction", "fetch_study", "predict_dicomweb", "predict_studies", "read_study_list",
           "MANIFEST", "SUMMARY_CSV", "SUMMARY_COLUMNS"]

MANIFEST = "manifest.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_COLUMNS = ("study_uid", "status", "seconds", "fetch_seconds", "store_seconds", "tumor_count",
                   "total_volume_ml", "stored", "error")
_IMAGE_MODALITIES = {"CT": "CT", "PT": "PET"}
# dicomweb-client logs every HTTP request at INFO; the bundle's logging config shows INFO, and a whole-study fetch
# would bury the one progress line per study.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


@dataclass
class DicomWebPrediction:
    """What :func:`predict_dicomweb` wrote and stored.

    Attributes:
        written: ``{"mask": path, "seg": path, ...}`` as :func:`predict` returns it.
        stored: SOP Instance UIDs stored back into the study (empty without ``store``).
        series: the SeriesInstanceUIDs fetched, by modality.
        seconds: wall time of ``fetch`` (QIDO-RS + WADO-RS), ``predict`` and ``store`` (STOW-RS + QIDO-RS check).
    """

    written: dict[str, Path]
    stored: list[str] = field(default_factory=list)
    series: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def fetch_study(
    client: Any,
    target: DicomWebStudy,
    folder: str | os.PathLike[str],
    ct_series: str | None = None,
    pet_series: str | None = None,
) -> dict[str, list[str]]:
    """Fetch the study's CT and PET series into ``folder/<modality>/<SeriesInstanceUID>/``.

    Without a choice every CT and PET series is fetched, and the folder rules choose among them; a chosen series is
    fetched alone.

    Returns:
        ``{"CT": [series uids], "PT": [series uids]}`` fetched.

    Raises:
        DicomWebError: the server fails, the study is not there, it has no CT or no PET series, or a chosen UID is
            not a series of that modality in the study.
    """
    records = study_series(client, target)
    found = "; ".join(r.describe() for r in records)
    chosen: dict[str, list[str]] = {}
    for modality, label in _IMAGE_MODALITIES.items():
        series = [r for r in records if r.modality == modality]
        wanted = ct_series if modality == "CT" else pet_series
        if wanted is not None:
            series = [r for r in series if r.uid == str(wanted)]
            if not series:
                option = "ct_series" if modality == "CT" else "pet_series"
                raise DicomWebError(f"{target}: {option}={wanted} is not a {label} series of the study; found {found}")
        if not series:
            raise DicomWebError(f"{target}: no {label} series (Modality {modality}) in the study; found {found}")
        chosen[modality] = [r.uid for r in series]
    for modality, uids in chosen.items():
        for uid in uids:
            retrieve_series(client, target, uid, Path(folder) / modality / uid)
    return chosen


def predict_dicomweb(
    address: str | DicomWebStudy,
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    store: bool = False,
    ct_series: str | None = None,
    pet_series: str | None = None,
    rtstruct: bool = False,
    **predict_kwargs: Any,
) -> DicomWebPrediction:
    """Segment one study of a DICOMweb server, and with ``store`` put the DICOM SEG (and RTSTRUCT) back into it.

    Args:
        address: ``dicomweb://HOST:PORT/PATH?study=STUDY_UID`` (see :mod:`cipa_bundle.io.dicomweb`).
        out_dir: output folder, as for :func:`predict`; the results stay here whether or not storing works.
        checkpoint: CIPA state_dict (default the bundle's ``models/model.pt``).
        store: send ``seg.dcm`` (and ``rtstruct.dcm``) to the study through STOW-RS and confirm them by QIDO-RS.
        ct_series, pet_series: choose a series by SeriesInstanceUID, as for a folder study.
        rtstruct: also write (and with ``store``, store) ``rtstruct.dcm``.
        **predict_kwargs: any other keyword of :func:`predict` (device, register, suv_kind, overrides...).

    Raises:
        DicomWebError: the server fails or refuses (the message names the URL and the study; a failed store says
            that the outputs are kept in ``out_dir``).
        CipaInputError: the study itself is refused by the pipeline, as a folder study would be.
    """
    target = address if isinstance(address, DicomWebStudy) else parse_dicomweb_url(str(address))
    client = open_client(target.url)
    out = Path(out_dir)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix=".cipa-dicomweb-", dir=out) as download:
            # Named after the study, so that the report's case is the StudyInstanceUID rather than a temporary name.
            study_dir = Path(download) / str(target.study_uid)
            start = time.perf_counter()
            series = fetch_study(client, target, study_dir, ct_series, pet_series)
            seconds["fetch"] = time.perf_counter() - start
            source = {"dicomweb": {"url": target.url, "study_instance_uid": target.study_uid, "series": series,
                                   "fetch_seconds": round(seconds["fetch"], 3)}}
            start = time.perf_counter()
            written = predict(study_dir, out, checkpoint, ct_series=ct_series, pet_series=pet_series,
                              rtstruct=rtstruct, report_extra=source, **predict_kwargs)
            seconds["predict"] = time.perf_counter() - start
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused study leaves no folder of its own behind
        raise
    result = DicomWebPrediction(written, series=series, seconds=seconds)
    if store:
        to_store = [written[key] for key in ("seg", "rtstruct") if key in written]
        start = time.perf_counter()
        try:
            result.stored = store_instances(client, target, to_store)
        except DicomWebError as err:
            raise DicomWebError(f"{err}; the outputs are kept in {out}") from None
        seconds["store"] = time.perf_counter() - start
    return result


def read_study_list(path: str | os.PathLike[str]) -> list[str]:
    """StudyInstanceUIDs from a text file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        CipaInputError: a missing file, a line that is not a UID (:func:`~cipa_bundle.io.dicomweb.is_uid`), or no UID.
    """
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CipaInputError(f"study list {source}: not readable ({err}); expected one StudyInstanceUID per line")
    uids: list[str] = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not is_uid(text):
            raise CipaInputError(f"study list {source}, line {number}: {text!r} is not a StudyInstanceUID "
                                 f"({UID_FORM})")
        if text not in uids:
            uids.append(text)
    if not uids:
        raise CipaInputError(f"study list {source} holds no StudyInstanceUID; expected one per line")
    return uids


def _load_manifest(path: Path, server: str) -> dict[str, Any]:
    if not path.is_file():
        return {"server": server, "studies": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CipaInputError(f"{path}: not readable JSON ({err}); move it away to start the batch afresh") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("studies"), dict):
        raise CipaInputError(f"{path}: expected {{'server': URL, 'studies': {{UID: record}}}}; move it away to start "
                             "afresh")
    if manifest.get("server") != server:
        raise CipaInputError(f"{path} belongs to a batch on {manifest.get('server')}; expected {server}: use another "
                             "output folder for another server")
    return manifest


def _write_summary(out: Path, uids: Sequence[str], studies: Mapping[str, Mapping[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for uid in uids:
        record = studies.get(uid, {})
        writer.writerow({"study_uid": uid, **{key: record.get(key, "") for key in SUMMARY_COLUMNS[1:]}})
    final = out / SUMMARY_CSV
    with atomic_outputs([final]) as (temp,):
        temp.write_text(buffer.getvalue(), encoding="utf-8")
    return final


def predict_studies(
    server: str,
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    studies: str | os.PathLike[str] | None = None,
    study_date: str | None = None,
    store: bool = False,
    rtstruct: bool = False,
    log: Any = None,
    **predict_kwargs: Any,
) -> Path:
    """Segment many studies of one DICOMweb server, one after another; resumable and failure-isolated.

    Each study's outputs go to ``out_dir/<StudyInstanceUID>/`` (built in a hidden folder beside it and renamed when
    complete, so a folder named after a study is always whole). A study that fails (bad data, a server error) is
    recorded with its one-line error and the batch goes on; a re-run retries it and skips the studies done.

    Args:
        server: ``dicomweb://HOST:PORT/PATH`` (no ``?study=``).
        out_dir: batch folder: one sub-folder per study, ``manifest.json`` and ``summary.csv``.
        checkpoint: CIPA state_dict (default the bundle's ``models/model.pt``).
        studies: a text file of StudyInstanceUIDs (:func:`read_study_list`).
        study_date: instead of ``studies``, a QIDO-RS StudyDate range, e.g. ``20240101-20240131``.
        store: store each study's SEG (and RTSTRUCT) back into it (:func:`predict_dicomweb`).
        rtstruct: also write an RTSTRUCT per study.
        log: a text stream for one progress line per study (default ``sys.stderr``).
        **predict_kwargs: any other keyword of :func:`predict` (``progress`` is off unless given).

    Returns:
        The path of ``summary.csv``: ``study_uid, status (done | failed), seconds, fetch_seconds, store_seconds,
        tumor_count, total_volume_ml, stored (objects stored back), error``.

    Raises:
        CipaInputError: neither or both of ``studies`` and ``study_date``, a bad study list, a manifest of another
            server, or a server that cannot be searched for the date range.
    """
    target = parse_dicomweb_url(server, require_study=False)
    if target.study_uid is not None:
        raise DicomWebError(f"{server}: a batch takes the server's address without ?study=; list the studies in a "
                            "file (--studies) or give a date range (--study_date)")
    if (studies is None) == (study_date is None):
        raise CipaInputError("predict_studies: give exactly one of studies=<file of StudyInstanceUIDs> and "
                             "study_date=<YYYYMMDD-YYYYMMDD>")
    stream = log if log is not None else sys.stderr
    uids = read_study_list(studies) if studies is not None else search_studies(open_client(target.url), target,
                                                                                str(study_date))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = _load_manifest(manifest_path, target.url)
    records: dict[str, Any] = manifest["studies"]
    predict_kwargs.setdefault("progress", False)
    for number, uid in enumerate(uids, start=1):
        final = out / uid
        previous = records.get(uid, {})
        if previous.get("status") == "done" and final.is_dir():
            print(f"[{number}/{len(uids)}] {uid}: done in an earlier run, skipped", file=stream, flush=True)
            continue
        staging = out / f".{uid}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        start = time.perf_counter()
        try:
            result = predict_dicomweb(target.with_study(uid), staging, checkpoint, store=store, rtstruct=rtstruct,
                                      **predict_kwargs)
            report = json.loads(result.written["report"].read_text(encoding="utf-8"))
            shutil.rmtree(final, ignore_errors=True)  # a stale folder of a run that stopped before its manifest
            os.replace(staging, final)
            record = {"status": "done", "fetch_seconds": round(result.seconds["fetch"], 2),
                      "store_seconds": round(result.seconds["store"], 2) if "store" in result.seconds else "",
                      "tumor_count": report["tumor_count"],
                      "total_volume_ml": round(float(report["total_volume_ml"]), 3), "stored": len(result.stored),
                      "error": ""}
        except Exception as err:  # noqa: BLE001 - one study's failure, of any kind, must not end the batch
            shutil.rmtree(staging, ignore_errors=True)
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if not isinstance(err, CipaInputError):
                message = f"{type(err).__name__}: {message}"
            record = {"status": "failed", "tumor_count": "", "total_volume_ml": "", "stored": 0, "error": message}
        record["seconds"] = round(time.perf_counter() - start, 2)
        records[uid] = record
        save_json(manifest, manifest_path)
        outcome = (f"done in {record['seconds']} s, {record['tumor_count']} tumour(s)" if record["status"] == "done"
                   else f"FAILED: {record['error']}")
        print(f"[{number}/{len(uids)}] {uid}: {outcome}", file=stream, flush=True)
    return _write_summary(out, uids, records)
