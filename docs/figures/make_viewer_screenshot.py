"""Make ``docs/figures/ohif_monailabel_seg.png``: MONAI Label's bundled OHIF viewer showing the PET-CT app's SEG.

The whole loop, as a user meets it: a real Orthanc (``tests/orthanc.py``) holds a phantom PET-CT study; a real
``monailabel start_server`` with ``cipa_bundle/apps/monailabel_petct`` infers its CT series (with the study's PET)
and saves the label as ``final``, so MONAI Label's datastore stores a DICOM SEG into Orthanc; then a real headless
Chromium opens MONAI Label's OHIF viewer on the study, loads the SEG as a viewer user would (double-click on it in
the study browser, "Yes"), sets the soft-tissue window and scrolls to the slice where the mask is largest.

Needs, beside the main environment: the MONAI Label environment (``CIPA_MONAILABEL_PYTHON``, README.md, with dcmqi),
Orthanc (``apt-get install orthanc orthanc-dicomweb``), Chromium (``apt-get install chromium``) and the
``websocket-client`` package in the interpreter that runs this script (for the Chrome DevTools Protocol).

Usage::

    python docs/figures/make_viewer_screenshot.py --checkpoint demo_output/models/model.pt

Screen positions assume the 1400 x 900 window set here (OHIF 3's default layout).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.orthanc: the same server set-up as the tests
WINDOW = (1400, 900)
SEGMENTATION_PANEL_BUTTON = (1382, 100)  # right-hand side bar, OHIF 3 default layout


class Chromium:
    """Headless Chromium driven through the DevTools Protocol (one page)."""

    def __init__(self) -> None:
        import requests
        import websocket

        from tests.orthanc import free_port

        port = free_port()
        self.process = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--use-angle=swiftshader", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--remote-debugging-port={port}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                pages = requests.get(f"http://127.0.0.1:{port}/json", timeout=1).json()
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        page = next(p for p in pages if p["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: object) -> dict:
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == number:
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

    def click(self, x: float, y: float, count: int = 1) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=count)

    def key(self, name: str, code: str, virtual: int, text: str | None = None) -> None:
        self.call("Input.dispatchKeyEvent", type="keyDown" if text else "rawKeyDown", key=name, code=code,
                  windowsVirtualKeyCode=virtual, **({"text": text} if text else {}))
        self.call("Input.dispatchKeyEvent", type="keyUp", key=name, code=code, windowsVirtualKeyCode=virtual)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.process.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="CIPA weights (e.g. the demo's models/model.pt)")
    parser.add_argument("--out", default=str(REPO / "docs" / "figures" / "ohif_monailabel_seg.png"))
    parser.add_argument("--seed", type=int, default=99, help="phantom seed")
    args = parser.parse_args(argv)

    import numpy as np
    import requests

    from cipa_bundle.synthetic.phantom import make_phantom_dataset
    from cipa_bundle.io.dicom import read_series
    from cipa_bundle.io.seg import read_dicom_seg_mask
    from tests.monailabel_server import MonaiLabelServer
    from tests.orthanc import OrthancServer

    label_python = os.environ.get("CIPA_MONAILABEL_PYTHON", "")
    if not Path(label_python).is_file():
        raise SystemExit("CIPA_MONAILABEL_PYTHON must name the MONAI Label environment's python (README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        case = make_phantom_dataset(work / "phantom", 1, seed=args.seed)[0]
        ct = read_series(case / "dicom" / "ct", modality="CT")
        orthanc = OrthancServer(work / "orthanc").start()
        server = browser = None
        try:
            (study,) = orthanc.upload(sorted((case / "dicom").rglob("*.dcm")))
            server = MonaiLabelServer(label_python, work, orthanc, Path(args.checkpoint))
            server.start()
            base = server.base
            answer = requests.post(f"{base}/infer/cipa_petct", params={"image": ct.series_uid, "output": "json"},
                                   data={"params": json.dumps({"save_label": True, "label_tag": "final"})},
                                   timeout=600)
            answer.raise_for_status()
            (seg_series,) = orthanc.series_of(study, "SEG")
            seg_uid = seg_series["0020000E"]["Value"][0]
            found = orthanc.session().post(f"{orthanc.rest}/tools/find", json={
                "Level": "Instance", "Query": {"SeriesInstanceUID": seg_uid}}).json()
            seg_file = work / "seg.dcm"
            seg_file.write_bytes(orthanc.session().get(f"{orthanc.rest}/instances/{found[0]}/file").content)
            mask = read_dicom_seg_mask(seg_file, ct.datasets)
            largest_k = int(np.argmax(mask.sum(axis=(0, 1))))
            print(f"SEG {seg_uid}: {int(mask.sum())} voxels, largest on slice k={largest_k}; "
                  f"infer answer {answer.json()}")

            browser = Chromium()
            browser.call("Page.enable")
            browser.call("Page.navigate", url=f"{base}/ohif/viewer?StudyInstanceUIDs={study}")
            time.sleep(15)
            browser.evaluate("Array.from(document.querySelectorAll('button'))"
                             ".find(b => b.innerText.includes('Confirm'))?.click()")
            # The SEG's entry in the study browser: double-click, then accept "open this Segmentation?".
            box = browser.evaluate(
                "(() => { const e = Array.from(document.querySelectorAll('div')).filter(d => "
                "d.innerText && d.innerText.startsWith('SEG') && d.innerText.includes('S:300'))"
                ".sort((a, b) => a.innerText.length - b.innerText.length)[0];"
                " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
            browser.click(*box)
            browser.click(*box, count=2)
            time.sleep(8)
            browser.evaluate("Array.from(document.querySelectorAll('button'))"
                             ".find(b => b.innerText.trim() === 'Yes')?.click()")
            time.sleep(12)
            browser.click(*SEGMENTATION_PANEL_BUTTON)
            time.sleep(3)
            browser.click(WINDOW[0] / 2, WINDOW[1] * 0.7)  # focus the viewport
            browser.key("1", "Digit1", ord("1"), text="1")  # OHIF's soft-tissue window preset (W 400, L 40)
            # OHIF shows the head-most slice first; the reader's k runs from the feet.
            for _ in range(len(ct.datasets) - 1 - largest_k):
                browser.key("ArrowDown", "ArrowDown", 40)
            time.sleep(4)
            shown = browser.evaluate("document.body.innerText.match(/I:\\s*\\d+ \\(\\d+\\/\\d+\\)/)?.[0]")
            expected = f"({len(ct.datasets) - largest_k}/{len(ct.datasets)})"
            if not shown or expected not in shown:
                raise SystemExit(f"the viewer shows image {shown!r}; expected {expected}")
            browser.screenshot(Path(args.out))
            print(f"wrote {args.out} ({shown})")
        finally:
            if browser is not None:
                browser.close()
            if server is not None:
                server.stop()
            orthanc.stop()


if __name__ == "__main__":
    main()
