"""A real ``monailabel start_server`` with the PET-CT app, on a DICOMweb server, for the tests and the viewer figure.

It runs in the MONAI Label environment (``CIPA_MONAILABEL_PYTHON``). The app folder is copied from
``cipa_bundle/apps/monailabel_petct`` (MONAI Label writes into it); the app's child process is this interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import requests

from tests.orthanc import PASSWORD, USER, OrthancServer, free_port, stop_process, wait_for_answer

APP_SOURCE = Path(__file__).resolve().parents[1] / "cipa_bundle" / "apps" / "monailabel_petct"


class MonaiLabelServer:
    """MONAI Label serving the PET-CT app on ``orthanc``'s DICOMweb root, with Orthanc's credentials.

    Args:
        label_python: the MONAI Label environment's interpreter; its ``bin`` (dcmqi's ``itkimage2segimage``) goes
            first on ``PATH``.
        root: a folder of its own: the app copy, MONAI Label's DICOMweb cache and the server log.
        orthanc: the running server whose ``/dicom-web`` is the datastore.
        checkpoint: the CIPA weights the app runs.
    """

    def __init__(self, label_python: str, root: Path, orthanc: OrthancServer, checkpoint: Path) -> None:
        self.root = Path(root)
        self.app = self.root / "app"
        shutil.copytree(APP_SOURCE, self.app)
        self.port = free_port()
        self.log = self.root / "monailabel.log"
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update({"MONAI_LABEL_DICOMWEB_USERNAME": USER, "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
                    "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(self.root / "cache"),
                    "PATH": str(Path(label_python).parent) + os.pathsep + env.get("PATH", "")})
        self.command = [label_python, "-m", "monailabel.main", "start_server", "--app", str(self.app), "--studies",
                        f"{orthanc.rest}/dicom-web", "--conf", "cipa_python", sys.executable, "--conf",
                        "checkpoint", str(Path(checkpoint).resolve()), "--host", "127.0.0.1", "--port",
                        str(self.port)]
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.is_file() else ""

    def start(self, timeout: float = 180.0) -> dict:
        """Start the server and wait for ``/info/``; returns that answer."""
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root)
        answer = wait_for_answer(self.process, lambda: requests.get(f"{self.base}/info/", timeout=5), timeout, 1.0)
        if answer is not None:
            return answer.json()
        self.stop()
        raise RuntimeError(f"monailabel did not start within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        stop_process(self.process, timeout=30)
        self.process = None
