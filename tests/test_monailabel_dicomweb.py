"""MONAI Label on a DICOMweb datastore (a real Orthanc), with the PET-CT app shipped in ``cipa_bundle/apps``.

A real ``monailabel start_server`` (the MONAI Label environment, ``CIPA_MONAILABEL_PYTHON``) serves
``cipa_bundle/apps/monailabel_petct`` on a real Orthanc holding a phantom PET-CT study. One infer request goes through
MONAI Label's REST API with the CT series as the image and ``save_label``; afterwards Orthanc holds a DICOM SEG of that
CT series, stored by MONAI Label's datastore, whose mask is the mask that ``predict`` gives for the same study read
from its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from cipa_bundle.inference.predict import predict
from cipa_bundle.io.dicom import read_series
from cipa_bundle.io.seg import read_dicom_seg_mask
from tests.conftest import REPO_ROOT
from tests.orthanc import PASSWORD, USER, OrthancServer, orthanc_available
from tests.test_inference import NO_POSTPROCESSING, tiny_checkpoint  # noqa: F401 - fixture, used by name
from tests.test_monailabel import LABEL_PYTHON, needs_monailabel

pytestmark = [
    needs_monailabel,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc and its DICOMweb plugin are not installed"),
]
APP = REPO_ROOT / "cipa_bundle" / "apps" / "monailabel_petct"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_monailabel_infers_a_pacs_ct_series_with_its_pet_and_stores_the_seg(
    tiny_checkpoint: Path, tmp_path: Path  # noqa: F811
) -> None:
    from cipa_bundle.data.phantom import make_phantom_dataset

    case = make_phantom_dataset(tmp_path / "phantom", 1, seed=31, noise=False, blur=False)[0]
    ct_files = sorted((case / "dicom" / "ct").glob("*.dcm"))
    ct_uid = str(pydicom.dcmread(ct_files[0]).SeriesInstanceUID)
    # The app's own post-processing defaults would empty the random network's mask: turn them off, as predict's
    # tests do, so that the SEG has something in it.
    weights = tmp_path / "weights.pt"
    shutil.copyfile(tiny_checkpoint, weights)

    orthanc = OrthancServer(tmp_path / "orthanc").start()
    server = None
    try:
        (study_uid,) = orthanc.upload(sorted((case / "dicom").rglob("*.dcm")))
        app = tmp_path / "app"
        shutil.copytree(APP, app)
        port = _free_port()
        label_bin = str(Path(LABEL_PYTHON).parent)  # dcmqi's itkimage2segimage, installed in the MONAI Label venv
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update({"MONAI_LABEL_DICOMWEB_USERNAME": USER, "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
                    "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
                    "PATH": label_bin + os.pathsep + env.get("PATH", "")})
        log = open(tmp_path / "monailabel.log", "w")  # noqa: SIM115 - closed in finally
        server = subprocess.Popen(
            [LABEL_PYTHON, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies",
             f"{orthanc.rest}/dicom-web", "--conf", "cipa_python", sys.executable, "--conf", "checkpoint",
             str(weights), "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        info = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = requests.get(f"{base}/info/", timeout=5)
                if answer.status_code == 200:
                    info = answer.json()
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert info is not None, (tmp_path / "monailabel.log").read_text()[-4000:]
        assert "cipa_petct" in info["models"]
        # MONAI Label lists the CT series as the datastore's images (the PET is not an image of its own): its
        # active-learning strategy hands out the CT, which is what a viewer would send.
        sample = requests.post(f"{base}/activelearning/random", json={}, timeout=60)
        assert sample.status_code == 200 and sample.json()["id"] == ct_uid, sample.text

        params = {"save_label": True, "label_tag": "final", "cipa_overrides": NO_POSTPROCESSING}
        answer = requests.post(f"{base}/infer/cipa_petct", params={"image": ct_uid, "output": "image"},
                               data={"params": json.dumps(params)}, timeout=600)
        assert answer.status_code == 200, answer.text[-2000:] + (tmp_path / "monailabel.log").read_text()[-4000:]

        segs = orthanc.series_of(study_uid, "SEG")
        assert len(segs) == 1, (tmp_path / "monailabel.log").read_text()[-4000:]
        seg_uid = segs[0]["0020000E"]["Value"][0]
        session = orthanc.session()
        found = session.post(f"{orthanc.rest}/tools/find", json={"Level": "Instance",
                                                                  "Query": {"SeriesInstanceUID": seg_uid}}).json()
        seg_file = tmp_path / "stored_seg.dcm"
        seg_file.write_bytes(session.get(f"{orthanc.rest}/instances/{found[0]}/file").content)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        orthanc.stop()

    seg = pydicom.dcmread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_uid and seg.StudyInstanceUID == study_uid
    ct = read_series(case / "dicom" / "ct", modality="CT")
    stored_mask = read_dicom_seg_mask(seg_file, ct.datasets)
    local = predict(case / "dicom", tmp_path / "local", weights, overrides=NO_POSTPROCESSING, progress=False)
    import nibabel as nib

    expected = np.asarray(nib.load(local["mask"]).dataobj) > 0
    assert expected.any()
    assert np.array_equal(stored_mask > 0, expected)
