"""A MONAI Label app for PET-CT on a DICOMweb server: MONAI Label hands it a CT series, it segments with PET and CT.

Run it in the MONAI Label environment (``.venv-label``, README.md), on a copy of this folder::

    monailabel start_server --app APP_DIR --studies http://127.0.0.1:8042/dicom-web \\
        --conf cipa_python /path/to/.venv/bin/python --conf checkpoint /path/to/models/model.pt

**Why a subprocess.** MONAI Label 0.8.5's server needs pydicom 2 (pydicom-seg), while ``cipa-bundle predict`` needs
pydicom 3: its DICOM SEG and RTSTRUCT code uses highdicom 0.28, which does not import under pydicom 2.4 (``cannot
import name 'parse_basic_offsets' from 'pydicom.encaps'``), and the package is only tested with pydicom 3. So the app
runs ``cipa-bundle predict`` of the *main* environment (``--conf cipa_python``) as a child process, and only MONAI
Label's own code runs in this one.

**What one infer request does** (``POST /infer/cipa_petct?image=<CT SeriesInstanceUID>``):

1. MONAI Label's DICOMweb datastore lists CT series as images (its default search filter), and fetches the CT.
2. The task finds the CT's study (QIDO-RS) and runs ``cipa-bundle predict dicomweb://...?study=<study>
   --ct_series <CT>``: the PET series of the same study is chosen with the folder rules (non-attenuation-corrected
   PET set aside), SUV is computed from its headers, the PET is resampled onto the CT, and the mask comes back on the
   CT grid.
3. With ``{"save_label": true, "label_tag": "final"}`` in the request's params, the mask goes back through the
   datastore (``save_label``): MONAI Label turns it into a DICOM SEG of the CT series (dcmqi) and stores it by
   STOW-RS into the study.

Credentials: MONAI Label's ``MONAI_LABEL_DICOMWEB_USERNAME`` / ``MONAI_LABEL_DICOMWEB_PASSWORD`` are handed on to the
child as ``CIPA_DICOMWEB_USER`` / ``CIPA_DICOMWEB_PASSWORD`` (never on its command line).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Any
from urllib.parse import urlsplit

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

logger = logging.getLogger(__name__)

MODEL = "cipa_petct"
LABELS = {"lung_tumor": 1}
# The SEG's segment, as MONAI Label's nifti_to_dicom_seg takes it (dcmqi metadata).
# model_name becomes the SEG's SeriesDescription.
SEGMENT = {"name": "lung_tumor", "description": "Lung tumour (CIPA PET-CT)", "color": [255, 0, 0],
           "model_name": "CIPA PET-CT"}
# A request's own key for the CT series: MONAI Label replaces "image" by a local file before the task runs.
CT_SERIES_KEY = "cipa_ct_series"


def _dicomweb_address(studies_url: str, study_uid: str) -> str:
    """``http(s)://host:port/path`` + study -> the ``dicomweb(s)://`` address that ``cipa-bundle predict`` takes."""
    parts = urlsplit(studies_url)
    scheme = {"http": "dicomweb", "https": "dicomwebs"}[parts.scheme]
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}?study={study_uid}"


class CipaPetCtInfer(InferTask):
    """One CT series in, the lung tumour mask on its grid out, computed with the study's PET by ``cipa-bundle``."""

    def __init__(self, studies_url: str, cipa_python: str, checkpoint: str, device: str = "cpu") -> None:
        super().__init__(type=InferType.SEGMENTATION, labels=LABELS, dimension=3,
                         description="CIPA lung tumour segmentation from the study's PET and CT (SUV, PET on CT)")
        self.studies_url = studies_url.rstrip("/")
        self.cipa_python = cipa_python
        self.checkpoint = checkpoint
        self.device = device

    def is_valid(self) -> bool:
        return os.path.isfile(self.cipa_python) and os.path.isfile(self.checkpoint)

    def _credentials(self) -> dict[str, str]:
        user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
        password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
        return {"CIPA_DICOMWEB_USER": user, "CIPA_DICOMWEB_PASSWORD": password} if user else {}

    def _study_of(self, series_uid: str) -> str:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        credentials = self._credentials()
        session = (create_session_from_user_pass(credentials["CIPA_DICOMWEB_USER"],
                                                 credentials["CIPA_DICOMWEB_PASSWORD"]) if credentials else None)
        client = DICOMwebClient(self.studies_url, session=session)
        found = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        if not found:
            raise ValueError(f"{self.studies_url}: series {series_uid} not found (QIDO-RS)")
        return str(found[0]["0020000D"]["Value"][0])

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        series_uid = request.get(CT_SERIES_KEY)
        if not series_uid:
            raise ValueError(f"{MODEL} takes a CT series of the DICOMweb datastore as 'image' (a SeriesInstanceUID)")
        study_uid = self._study_of(series_uid)
        work = tempfile.mkdtemp(prefix="cipa-monailabel-")
        out = os.path.join(work, "prediction")
        command = [self.cipa_python, "-m", "cipa_bundle", "predict", _dicomweb_address(self.studies_url, study_uid),
                   out, "--ct_series", series_uid, "--checkpoint", self.checkpoint,
                   "--device", str(request.get("device") or self.device)]
        overrides = request.get("cipa_overrides")
        if overrides:
            command += ["--override", repr(dict(overrides))]
        # MONAI Label appends the app folder to PYTHONPATH; the child is another environment and needs none of it.
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(self._credentials())
        logger.info("CIPA PET-CT: %s", " ".join(command))
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"cipa-bundle predict failed for study {study_uid}: {done.stderr.strip()[-2000:]}")
            with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
                report = json.load(handle)
            # MONAI Label's server removes the result file once it has sent it, not a folder around it: the mask
            # leaves the work folder, which is removed whole.
            descriptor, mask = tempfile.mkstemp(prefix="cipa-monailabel-", suffix=".nii.gz")
            os.close(descriptor)
            shutil.move(os.path.join(out, "mask.nii.gz"), mask)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return mask, {"label_names": LABELS, "study_instance_uid": study_uid, "ct_series_instance_uid": series_uid,
                      "tumor_count": report["tumor_count"], "total_volume_ml": report["total_volume_ml"],
                      "pet_series": report["dicomweb"]["series"]["PT"]}


class CipaPetCtApp(MONAILabelApp):
    """The app: one infer task, ``cipa_petct``; labels saved as ``final`` go back to the PACS as a DICOM SEG."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        if not studies.startswith(("http://", "https://")):
            raise ValueError(f"--studies {studies}: this app needs a DICOMweb server (http(s)://HOST:PORT/PATH); "
                             "a local folder of fused NIfTIs belongs to the bundle in the monaibundle app")
        self.cipa_python = conf.get("cipa_python") or os.environ.get("CIPA_BUNDLE_PYTHON", "")
        self.checkpoint = conf.get("checkpoint", "")
        for key, value in (("cipa_python", self.cipa_python), ("checkpoint", self.checkpoint)):
            if not value or not os.path.isfile(value):
                raise ValueError(f"--conf {key} {value!r}: expected an existing file (the main environment's python "
                                 "with cipa-bundle installed, and a CIPA state_dict)")
        self.device = conf.get("device", "cpu")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="CIPA PET-CT",
                         description="Lung tumour segmentation in PET-CT (CIPA) on a DICOMweb server",
                         labels=LABELS)

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL: CipaPetCtInfer(self.studies, self.cipa_python, self.checkpoint, self.device)}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        request = dict(request)
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            request[CT_SERIES_KEY] = image
        save = str(request.get("save_label", False)).lower() in ("1", "true")
        tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
        request["save_label"] = False  # saved below, with the segment's name and colour for the DICOM SEG
        result = super().infer(request, datastore)
        if save and result.get("file"):
            store = datastore if datastore else self.datastore()
            result["label"] = store.save_label(image, result["file"], tag,
                                               {"model": MODEL, "params": result.get("params"),
                                                "label_info": [SEGMENT]})
            result["tag"] = tag
        return result
