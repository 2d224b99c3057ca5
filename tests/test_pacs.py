"""``predict`` and ``predict-studies`` against a real Orthanc PACS (DICOMweb: QIDO-RS, WADO-RS, STOW-RS).

Each server is a real Orthanc process (``tests/orthanc.py``) on a loopback port. Phantom studies are put in by STOW-RS
through ``dicomweb-client`` itself and results are looked for with plain HTTP requests, so neither side of a check is
the code under test. The network is the tiny random CIPA of ``test_inference``: masks mean nothing, so the checks are
that a PACS study gives exactly the mask of the same study read from a folder, and the bookkeeping around it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cipa_bundle.inference.pacs import MANIFEST, SUMMARY_COLUMNS, fetch_study, predict_dicomweb, predict_studies
from cipa_bundle.inference.predict import predict
from cipa_bundle.io.dicomweb import (
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    DicomWebError,
    open_client,
    parse_dicomweb_url,
    search_studies,
)
from cipa_bundle.preprocessing.convert import find_study_series
from tests.orthanc import PASSWORD, USER, OrthancServer, orthanc_available
from tests.test_convert import _copy_series
from tests.test_inference import NO_POSTPROCESSING, tiny_checkpoint  # noqa: F401 - fixture, used by name

pytestmark = pytest.mark.skipif(
    not orthanc_available(),
    reason="Orthanc and its DICOMweb plugin are not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)",
)

# Orthanc's Lua hook: the server answers STOW-RS with success and then discards every SEG (a site policy).
DISCARD_SEG = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= 'SEG'
end
"""


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def studies(server: OrthancServer, tmp_path_factory) -> dict[str, Path]:
    """Three phantom studies on the server: StudyInstanceUID -> the case folder they came from."""
    from cipa_bundle.synthetic.phantom import make_phantom_dataset

    found = {}
    for case in make_phantom_dataset(tmp_path_factory.mktemp("pacs_phantoms"), 3, seed=11, noise=False, blur=False):
        (uid,) = server.upload(sorted((case / "dicom").rglob("*.dcm")))
        found[uid] = case
    assert len(found) == 3
    return found


@pytest.fixture
def credentials(monkeypatch) -> None:
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)


def _uids(studies: dict[str, Path]) -> list[str]:
    return sorted(studies)


# --------------------------------------------------------------------------------------------- addresses
def test_dicomweb_addresses_are_parsed_and_bad_ones_refused() -> None:
    study = parse_dicomweb_url("dicomweb://pacs.example.org:8042/dicom-web/?study=1.2.3")
    assert (study.url, study.study_uid) == ("http://pacs.example.org:8042/dicom-web", "1.2.3")
    assert parse_dicomweb_url("DICOMWEBS://pacs/wado", require_study=False).url == "https://pacs/wado"
    for bad, message in [
        ("http://pacs:8042/dicom-web?study=1.2.3", "not a DICOMweb address"),
        ("dicomweb://pacs:8042/dicom-web", "no study given"),
        ("dicomweb://pacs:8042/dicom-web?study=1.2&series=3", r"unknown query key\(s\) \['series'\]"),
        ("dicomweb://pacs:8042/dicom-web?study=", "one non-empty study"),
        ("dicomweb://pacs:8042/dicom-web?study=../../etc", r"study='\.\./\.\./etc' is not a StudyInstanceUID"),
    ]:
        with pytest.raises(DicomWebError, match=message):
            parse_dicomweb_url(bad)
    with pytest.raises(DicomWebError, match=f"credentials in the address are refused.*{ENV_USER}") as err:
        parse_dicomweb_url("dicomweb://alice:hunter2@pacs:8042/dicom-web?study=1.2.3")
    assert "hunter2" not in str(err.value)


# --------------------------------------------------------------------------------------------- one study
def test_predict_a_pacs_study_by_uid_and_store_the_seg_back(
    server: OrthancServer, studies: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path  # noqa: F811
) -> None:
    uid = _uids(studies)[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({ENV_USER: USER, ENV_PASSWORD: PASSWORD})
    out = tmp_path / "pacs"
    result = subprocess.run(
        [sys.executable, "-m", "cipa_bundle", "predict", server.address(uid), str(out), "--checkpoint",
         str(tiny_checkpoint), "--override", repr(NO_POSTPROCESSING), "--rtstruct", "--store"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert PASSWORD not in result.stdout + result.stderr

    # The same study read from its folder gives the same mask, voxel for voxel: the PACS path adds nothing.
    local = predict(studies[uid] / "dicom", tmp_path / "folder", tiny_checkpoint, overrides=NO_POSTPROCESSING,
                    progress=False)
    pacs_mask, local_mask = nib.load(out / "mask.nii.gz"), nib.load(local["mask"])
    assert np.array_equal(np.asarray(pacs_mask.dataobj), np.asarray(local_mask.dataobj))
    assert np.array_equal(pacs_mask.affine, local_mask.affine)
    assert np.asarray(pacs_mask.dataobj).any()

    # The SEG and the RTSTRUCT are in the study afterwards (QIDO-RS by plain HTTP), as the files written locally.
    for modality, name in (("SEG", "seg.dcm"), ("RTSTRUCT", "rtstruct.dcm")):
        series = server.series_of(uid, modality)
        assert len(series) == 1, modality
        local_file = pydicom.dcmread(out / name)
        assert series[0]["0020000E"]["Value"][0] == local_file.SeriesInstanceUID
        assert local_file.StudyInstanceUID == uid
    report = json.loads((out / "report.json").read_text())
    assert report["dicomweb"]["study_instance_uid"] == uid and report["input"]["case"] == uid
    assert report["dicomweb"]["url"] == f"http://127.0.0.1:{server.http_port}/dicom-web"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mask.nii.gz", "seg.dcm", "rtstruct.dcm", "overlay_axial.png", "mip_coronal.png", "report.json"]
    )  # the downloaded study is gone


def test_pacs_series_follow_the_folder_rules(
    server: OrthancServer, studies: dict[str, Path], credentials: None, tmp_path: Path
) -> None:
    """A second, non-attenuation-corrected PET in the study is fetched and then set aside, as in a folder."""
    uid = _uids(studies)[1]
    pet = sorted((studies[uid] / "dicom" / "pet").glob("*.dcm"))

    def non_attenuation_corrected(ds: pydicom.Dataset) -> None:
        ds.CorrectedImage, ds.SeriesDescription = ["DECY"], "PET NAC"

    nac_uid = _copy_series(studies[uid] / "dicom" / "pet", tmp_path / "nac", "PET NAC", non_attenuation_corrected)
    server.upload(sorted((tmp_path / "nac").glob("*.dcm")))
    ac_uid = pydicom.dcmread(pet[0]).SeriesInstanceUID

    target = parse_dicomweb_url(server.address(uid))
    fetched = fetch_study(open_client(target.url), target, tmp_path / "all")
    assert sorted(fetched["PT"]) == sorted([nac_uid, ac_uid])
    _, pet_files = find_study_series(tmp_path / "all")
    assert {pydicom.dcmread(f).SeriesInstanceUID for f in pet_files} == {ac_uid}

    chosen = fetch_study(open_client(target.url), target, tmp_path / "chosen", pet_series=nac_uid)
    assert chosen["PT"] == [nac_uid] and len(list((tmp_path / "chosen" / "PT").rglob("*.dcm"))) == len(pet)
    with pytest.raises(DicomWebError, match=r"ct_series=1\.2\.3 is not a CT series of the study; found .*PT series"):
        fetch_study(open_client(target.url), target, tmp_path / "wrong", ct_series="1.2.3")

    # A study with a CT and nothing else: refused before anything is fetched, naming what the study holds.
    ct_only_study = generate_uid()

    def in_a_study_of_its_own(ds: pydicom.Dataset) -> None:
        ds.StudyInstanceUID, ds.StudyDate = ct_only_study, "20000101"  # a date outside the batch tests' range

    _copy_series(studies[uid] / "dicom" / "ct", tmp_path / "ct_only", "CT only", in_a_study_of_its_own)
    server.upload(sorted((tmp_path / "ct_only").glob("*.dcm")))
    lonely = parse_dicomweb_url(server.address(ct_only_study))
    with pytest.raises(DicomWebError, match=f"study {ct_only_study}: no PET series \\(Modality PT\\) in the study; "
                                            "found CT series"):
        fetch_study(open_client(lonely.url), lonely, tmp_path / "lonely")
    assert not (tmp_path / "lonely").exists()


def test_a_study_that_is_not_there_ends_with_one_line(
    server: OrthancServer, studies: dict[str, Path], tiny_checkpoint: Path, credentials: None,  # noqa: F811
    tmp_path: Path, capsys,
) -> None:
    from cipa_bundle.cli import main

    address = server.address("1.2.826.0.1.3680043.8.498.999")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", address, str(tmp_path / "o"), "--checkpoint", str(tiny_checkpoint)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"127.0.0.1:{server.http_port}/dicom-web study 1.2.826.0.1.3680043.8.498.999: study not found" in lines[0]
    assert not (tmp_path / "o").exists()  # nothing downloaded or written is left, not even the folder


def test_authentication_failures_name_the_server_and_never_the_secret(
    server: OrthancServer, studies: dict[str, Path], tiny_checkpoint: Path, monkeypatch, tmp_path: Path  # noqa: F811
) -> None:
    uid = _uids(studies)[0]
    for env in ({}, {ENV_USER: USER, ENV_PASSWORD: "wrong-password"}, {ENV_TOKEN: "not-a-valid-token"}):
        for key in (ENV_USER, ENV_PASSWORD, ENV_TOKEN):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(DicomWebError) as err:
            predict_dicomweb(server.address(uid), tmp_path / "o", tiny_checkpoint, progress=False)
        message = str(err.value)
        assert f"study {uid}: authentication failed" in message and "HTTP 401" in message, message
        assert "wrong-password" not in message and "not-a-valid-token" not in message
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    with pytest.raises(DicomWebError, match=f"{ENV_USER} and {ENV_PASSWORD} must be set together"):
        open_client(server.rest)


def test_a_refused_store_keeps_the_files_and_a_stopped_server_is_unreachable(
    studies: dict[str, Path], tiny_checkpoint: Path, credentials: None, tmp_path: Path  # noqa: F811
) -> None:
    strict = OrthancServer(tmp_path / "strict_orthanc", lua=DISCARD_SEG).start()
    try:
        uid = _uids(studies)[2]
        strict.upload(sorted((studies[uid] / "dicom").rglob("*.dcm")))
        out = tmp_path / "kept"
        with pytest.raises(DicomWebError) as err:
            predict_dicomweb(strict.address(uid), out, tiny_checkpoint, store=True, overrides=NO_POSTPROCESSING,
                             progress=False)
        message = str(err.value)
        assert f"study {uid}: the server answered STOW-RS without an error but does not list seg.dcm" in message
        assert f"the outputs are kept in {out}" in message
        assert (out / "seg.dcm").is_file() and (out / "mask.nii.gz").is_file()
        assert strict.series_of(uid, "SEG") == []  # the Lua filter really discarded it
    finally:
        strict.stop()
    with pytest.raises(DicomWebError, match=f"127.0.0.1:{strict.http_port}/dicom-web study {uid}: server unreachable"):
        predict_dicomweb(strict.address(uid), tmp_path / "after", tiny_checkpoint, progress=False)
    assert not (tmp_path / "after").exists()


# --------------------------------------------------------------------------------------------- batch
def test_batch_isolates_a_broken_study_and_a_rerun_completes_it(
    server: OrthancServer, studies: dict[str, Path], tiny_checkpoint: Path, credentials: None,  # noqa: F811
    tmp_path: Path, capsys,
) -> None:
    from cipa_bundle.cli import main

    uids = _uids(studies)
    broken = uids[1]
    pet = sorted((studies[broken] / "dicom" / "pet").glob("*.dcm"))
    # The same PET instances without PatientWeight: SUV (body weight) cannot be computed and the study is refused.
    no_weight = tmp_path / "no_weight"
    no_weight.mkdir()
    for path in pet:
        ds = pydicom.dcmread(path)
        del ds.PatientWeight
        ds.save_as(no_weight / path.name, enforce_file_format=True)
    server.upload(sorted(no_weight.glob("*.dcm")))

    study_list = tmp_path / "studies.txt"
    study_list.write_text("# three phantom studies\n" + "\n".join(uids) + "\n\n")
    out = tmp_path / "batch"
    args = ["predict-studies", server.dicomweb, str(out), "--studies", str(study_list), "--checkpoint",
            str(tiny_checkpoint), "--override", repr(NO_POSTPROCESSING), "--store"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "1 of 3 studies failed" in err and broken in err

    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [row["study_uid"] for row in rows] == uids and list(rows[0]) == list(SUMMARY_COLUMNS)
    status = {row["study_uid"]: row for row in rows}
    assert status[broken]["status"] == "failed" and "PatientWeight" in status[broken]["error"]
    for uid in set(uids) - {broken}:
        assert status[uid]["status"] == "done"
        report = json.loads((out / uid / "report.json").read_text())
        assert int(status[uid]["tumor_count"]) == report["tumor_count"]
        assert float(status[uid]["total_volume_ml"]) == pytest.approx(report["total_volume_ml"], abs=1e-3)
        assert status[uid]["stored"] == "1" and float(status[uid]["fetch_seconds"]) > 0
        assert server.has_instance(uid, pydicom.dcmread(out / uid / "seg.dcm").SOPInstanceUID)
    assert not (out / broken).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*set(uids) - {broken}, "manifest.json", "summary.csv"])
    done_before = {uid: (out / uid / "report.json").stat().st_mtime_ns for uid in set(uids) - {broken}}

    # Mend the study on the server and run the batch again, this time over a QIDO-RS date range: the done studies
    # are skipped, untouched, and the mended one completes.
    server.upload(pet)
    study_date = pydicom.dcmread(pet[0]).StudyDate
    main([*args[:3], "--study_date", f"{study_date}-{study_date}", *args[5:]])
    err = capsys.readouterr().err
    assert err.count("done in an earlier run, skipped") == 2
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert sorted(row["study_uid"] for row in rows) == uids and {row["status"] for row in rows} == {"done"}
    assert server.has_instance(broken, pydicom.dcmread(out / broken / "seg.dcm").SOPInstanceUID)
    assert {uid: (out / uid / "report.json").stat().st_mtime_ns for uid in done_before} == done_before
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["server"] == f"http://127.0.0.1:{server.http_port}/dicom-web"
    assert {uid: record["status"] for uid, record in manifest["studies"].items()} == dict.fromkeys(uids, "done")
    assert not list(out.glob(".*"))  # no staging folder left


def test_batch_inputs_are_checked(server: OrthancServer, studies: dict[str, Path], credentials: None,
                                  tmp_path: Path) -> None:
    target = parse_dicomweb_url(server.dicomweb, require_study=False)
    date = pydicom.dcmread(next((next(iter(studies.values())) / "dicom" / "ct").glob("*.dcm"))).StudyDate
    assert sorted(search_studies(open_client(target.url), target, f"{date}-")) == _uids(studies)
    assert search_studies(open_client(target.url), target, "19000101-19000102") == []
    with pytest.raises(DicomWebError, match="study date '2024-01'; expected YYYYMMDD"):
        search_studies(open_client(target.url), target, "2024-01")
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("1.2.3\nnot-a-uid\n")
    with pytest.raises(Exception, match=r"bad.txt, line 2: 'not-a-uid' is not a StudyInstanceUID"):
        predict_studies(server.dicomweb, tmp_path / "b", studies=bad_list)
    with pytest.raises(Exception, match="exactly one of studies="):
        predict_studies(server.dicomweb, tmp_path / "b")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text(json.dumps({"server": "http://elsewhere/dicom-web", "studies": {}}))
    good_list = tmp_path / "good.txt"
    good_list.write_text("1.2.3\n")
    with pytest.raises(Exception, match="belongs to a batch on http://elsewhere/dicom-web"):
        predict_studies(server.dicomweb, tmp_path / "other", studies=good_list)
    shutil.rmtree(tmp_path / "other")
