"""A real Orthanc DICOM server for the tests: started on loopback ports with its own storage and configuration.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide the server and its DICOMweb plugin (``.ci/run``
installs them). Studies are put in by STOW-RS through ``dicomweb-client`` directly, not through the code under test,
and the tests look for results with plain HTTP requests (QIDO-RS).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "cipa", "cipa-test-password"


def wait_for_answer(process: subprocess.Popen, get, timeout: float, interval: float):  # noqa: ANN001
    """Poll ``get()`` (an HTTP GET) until it answers 200, the process exits or ``timeout`` s pass.

    Returns:
        The 200 response, or ``None`` (the process exited, or it did not answer in time).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            answer = get()
            if answer.status_code == 200:
                return answer
        except requests.ConnectionError:
            pass
        time.sleep(interval)
    return None


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """Terminate a server process; kill it when it has not stopped after ``timeout`` s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def orthanc_available() -> bool:
    return Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancServer:
    """One Orthanc process: HTTP (REST + DICOMweb at ``/dicom-web``) and DIMSE on free loopback ports.

    Args:
        root: a folder of its own: configuration, storage and the server's log.
        lua: a Lua script for the server (e.g. a ``ReceivedInstanceFilter`` that discards some objects).
    """

    def __init__(self, root: Path, lua: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "cipa-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # A fixed study may be put in again after a test has changed it (the batch test mends a broken study).
            "OverwriteInstances": True,
        }
        if lua is not None:
            (self.root / "script.lua").write_text(lua)
            config["LuaScripts"] = [str(self.root / "script.lua")]
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The ``dicomweb://`` address of the server (no study)."""
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    def address(self, study_uid: str) -> str:
        return f"{self.dicomweb}?study={study_uid}"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = (USER, PASSWORD)
        return session

    def start(self, timeout: float = 30.0) -> OrthancServer:
        log = open(self.root / "orthanc.log", "w")  # noqa: SIM115 - the process writes it until stop()
        self.process = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=log,
                                        cwd=self.root)
        session = self.session()
        if wait_for_answer(self.process, lambda: session.get(f"{self.rest}/system", timeout=2), timeout, 0.2):
            return self
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.process.returncode}: "
                               f"{(self.root / 'orthanc.log').read_text()[-2000:]}")
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s on port {self.http_port}")

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
        self.process = None

    def upload(self, files: Iterable[os.PathLike[str] | str]) -> set[str]:
        """Store DICOM files into the server by STOW-RS (``dicomweb-client`` itself, not the code under test).

        Returns:
            The StudyInstanceUIDs the files belong to.
        """
        import pydicom
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(f"{self.rest}/dicom-web", session=self.session())
        by_study: dict[str, list] = {}
        for path in files:
            ds = pydicom.dcmread(path)
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        for study, datasets in by_study.items():
            answer = client.store_instances(datasets, study_instance_uid=study)
            if answer.get("FailedSOPSequence"):
                raise RuntimeError(f"Orthanc refused {len(answer.FailedSOPSequence)} instance(s) of study {study}")
        return set(by_study)

    def series_of(self, study_uid: str, modality: str | None = None) -> list[dict]:
        """QIDO-RS, by plain HTTP: the study's series (DICOM JSON), optionally of one modality."""
        params = {"Modality": modality} if modality else None
        answer = self.session().get(f"{self.rest}/dicom-web/studies/{study_uid}/series", params=params, timeout=30)
        answer.raise_for_status()
        return answer.json() if answer.content else []

    def has_instance(self, study_uid: str, sop_instance_uid: str) -> bool:
        """QIDO-RS, by plain HTTP: whether the study lists this SOP Instance UID."""
        answer = self.session().get(f"{self.rest}/dicom-web/studies/{study_uid}/instances",
                                    params={"SOPInstanceUID": sop_instance_uid}, timeout=30)
        answer.raise_for_status()
        return bool(answer.content) and any(
            item["00080018"]["Value"][0] == sop_instance_uid for item in answer.json()
        )
