"""MONAI Label on a DICOMweb datastore (a real Orthanc), with the PET-CT app shipped in ``cipa_bundle/apps``.

A real ``monailabel start_server`` (the MONAI Label environment, ``CIPA_MONAILABEL_PYTHON``) serves
``cipa_bundle/apps/monailabel_petct`` on a real Orthanc holding a phantom PET-CT study. One infer request goes through
MONAI Label's REST API with the CT series as the image and ``save_label``; afterwards Orthanc holds a DICOM SEG of that
CT series, stored by MONAI Label's datastore, whose mask is the mask that ``predict`` gives for the same study read
from its folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from cipa_bundle.inference.predict import predict
from cipa_bundle.io.dicom import read_series
from cipa_bundle.io.seg import read_dicom_seg_mask
from tests.monailabel_server import MonaiLabelServer
from tests.orthanc import OrthancServer, orthanc_available
from tests.test_inference import NO_POSTPROCESSING, tiny_checkpoint  # noqa: F401 - fixture, used by name
from tests.test_monailabel import LABEL_PYTHON, needs_monailabel

pytestmark = [
    needs_monailabel,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc and its DICOMweb plugin are not installed"),
]


def test_monailabel_infers_a_pacs_ct_series_with_its_pet_and_stores_the_seg(
    tiny_checkpoint: Path, tmp_path: Path  # noqa: F811
) -> None:
    from cipa_bundle.synthetic.phantom import make_phantom_dataset

    case = make_phantom_dataset(tmp_path / "phantom", 1, seed=31, noise=False, blur=False)[0]
    ct_files = sorted((case / "dicom" / "ct").glob("*.dcm"))
    ct_uid = str(pydicom.dcmread(ct_files[0]).SeriesInstanceUID)

    orthanc = OrthancServer(tmp_path / "orthanc").start()
    server = MonaiLabelServer(LABEL_PYTHON, tmp_path, orthanc, tiny_checkpoint)
    try:
        (study_uid,) = orthanc.upload(sorted((case / "dicom").rglob("*.dcm")))
        info = server.start()
        assert "cipa_petct" in info["models"]
        # MONAI Label lists the CT series as the datastore's images (the PET is not an image of its own): its
        # active-learning strategy hands out the CT, which is what a viewer would send.
        sample = requests.post(f"{server.base}/activelearning/random", json={}, timeout=60)
        assert sample.status_code == 200 and sample.json()["id"] == ct_uid, sample.text

        # The random network's mask would not survive the default size filters: the request turns them off, as
        # predict's own tests do, so that the SEG has something in it.
        params = {"save_label": True, "label_tag": "final", "cipa_overrides": NO_POSTPROCESSING}
        answer = requests.post(f"{server.base}/infer/cipa_petct", params={"image": ct_uid, "output": "image"},
                               data={"params": json.dumps(params)}, timeout=600)
        assert answer.status_code == 200, answer.text[-2000:] + server.log_tail()

        segs = orthanc.series_of(study_uid, "SEG")
        assert len(segs) == 1, server.log_tail()
        seg_uid = segs[0]["0020000E"]["Value"][0]
        session = orthanc.session()
        found = session.post(f"{orthanc.rest}/tools/find", json={"Level": "Instance",
                                                                  "Query": {"SeriesInstanceUID": seg_uid}}).json()
        seg_file = tmp_path / "stored_seg.dcm"
        seg_file.write_bytes(session.get(f"{orthanc.rest}/instances/{found[0]}/file").content)
    finally:
        server.stop()
        orthanc.stop()

    seg = pydicom.dcmread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_uid and seg.StudyInstanceUID == study_uid
    ct = read_series(case / "dicom" / "ct", modality="CT")
    stored_mask = read_dicom_seg_mask(seg_file, ct.datasets)
    local = predict(case / "dicom", tmp_path / "local", tiny_checkpoint, overrides=NO_POSTPROCESSING, progress=False)
    expected = np.asarray(nib.load(local["mask"]).dataobj) > 0
    assert expected.any()
    assert np.array_equal(stored_mask > 0, expected)
