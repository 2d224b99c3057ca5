"""Fuzzing PET header fields: the converter returns a finite positive SUV or raises a documented error, nothing else.

Hypothesis draws the SUV-relevant header fields (valid values, edge values and garbage stored verbatim as raw bytes,
so the files hold exactly what a broken scanner or anonymiser could write), writes a real two-slice PET series and
runs :func:`~cipa_bundle.preprocessing.suv_series.write_suv`. Either both outputs exist and hold finite, positive SUVs, or
the error is a ``SuvError`` / ``DicomSeriesError`` and no output file (nor temporary) exists.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from cipa_bundle.io.dicom import DicomSeriesError
from cipa_bundle.synthetic.dicom_writer import write_image_series
from cipa_bundle.preprocessing import suv_errors, suv_series

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

BQML = 5000.0


def raw(tag: int, vr: str, text: str) -> RawDataElement:
    data = text.encode("ascii")
    data += b" " * (len(data) % 2)
    return RawDataElement(Tag(tag), vr, len(data), data, 0, False, True)


def mostly(valid: st.SearchStrategy[Any], *others: Any) -> st.SearchStrategy[Any]:
    """``valid`` about four times in five, else one of ``others`` (edge values, garbage, ``None`` = absent).

    Most fields stay valid so that the deep paths (reference time, injection time, decay) are reached, and the
    chooser shrinks towards the valid value so a failing example shows only the fields that matter.
    """
    return st.tuples(st.integers(0, 4), valid, st.sampled_from(others)).map(lambda t: t[2] if t[0] == 4 else t[1])


def floats(low: float, high: float) -> st.SearchStrategy[str]:
    """A float in [low, high] as DS text (at most 16 characters)."""
    return st.floats(low, high, allow_nan=False).map(lambda x: f"{x:.10g}")


def clock(hours: tuple[int, int]) -> st.SearchStrategy[str]:
    return st.builds(lambda h, m, s: f"{h:02d}{m:02d}{s:02d}", st.integers(*hours), st.integers(0, 59),
                     st.integers(0, 59))


BAD_TIMES = (None, "", "2561", "12:30:00", "1x0000", "0900", "093000.5", "235900")
BAD_DATES = (None, "", "20240102", "20231231", "2024.01.01", "20241301", "abc")

HEADERS = st.fixed_dictionaries({
    "weight": mostly(floats(30, 150), None, "", "0", "-70", "0.5", "70000", "2000000", "nan", "inf", "abc", "1e300"),
    "size": mostly(floats(1.4, 2.1), None, "", "0", "180", "nan", "2.9"),
    "sex": mostly(st.sampled_from(["M", "F"]), None, "", "O", "X"),
    "dose": mostly(floats(1e8, 8e8), None, "", "0", "-1", "370", "5e5", "1e12", "nan", "x", "1e-300", "0.5"),
    "half_life": mostly(st.sampled_from(["6586.2", "6588", "4057.7", "1223"]), None, "", "0", "-1", "1e-300",
                        "1e300", "nan", "76"),
    "items": mostly(st.just(1), 0, 2),
    "inj_dt": mostly(st.builds(lambda t: "20240101" + t, clock((7, 9))), None, "", "2024", "20240101",
                     "20240101250000", "20240101090000+0100", "20231231235000", "20240101103000", "garbage",
                     "19000101090000"),
    "inj_tm": mostly(clock((7, 9)), *BAD_TIMES),
    "units": mostly(st.just("BQML"), "CNTS", "GML", "PROPCPS", "", "bqml"),
    "suv_type": mostly(st.none(), "", "BW", "LBM"),
    "dc": mostly(st.just("START"), "ADMIN", "NONE", "", "XX"),
    "corrected": mostly(st.just(["ATTN", "DECY", "SCAT"]), [], ["ATTN"], ["DECY"], ["ATTN", "SCAT"]),
    "series_date": mostly(st.just("20240101"), *BAD_DATES),
    "series_time": mostly(clock((9, 11)), *BAD_TIMES),
    "acq_date": mostly(st.just("20240101"), *BAD_DATES),
    "acq_times": st.tuples(mostly(clock((9, 11)), *BAD_TIMES), mostly(clock((9, 11)), *BAD_TIMES)),
    "frt": mostly(st.sampled_from([None, "0"]), "60000", "-5", "1e12", "nan", "1e-300"),
    "afd": mostly(st.sampled_from([None, "120000", "300000"]), "0", "-1", "99999999999"),
    "intercept": mostly(st.just("0"), "5", "abc", "", "nan"),
    "suvsf": mostly(st.none(), "0", "0.000628", "-1", "1e300", "nan", "1e-300"),
    "acsf": mostly(st.none(), "0", "2.5", "-1", "nan", "1e5"),
    "ge": mostly(st.none(), "20240101100000", "20240101093000", "junk", "20240101"),
    "vary_weight": mostly(st.just(False), True),
    "kind": st.sampled_from(["bw", "lbm", "bsa"]),
    "allow_decay_none": st.booleans(),
    "mbq_heuristic": st.booleans(),
})


def build(folder: Path, h: dict[str, Any]) -> None:
    def per_slice(k: int, ds: Dataset) -> None:
        for keyword in ("PatientWeight", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
                        "FrameReferenceTime", "ActualFrameDuration", "Units", "DecayCorrection", "CorrectedImage",
                        "RescaleIntercept"):
            if keyword in ds:
                delattr(ds, keyword)
        fields = {
            0x00101030: ("DS", h["weight"] if not (h["vary_weight"] and k == 1) else "71"),
            0x00101020: ("DS", h["size"]),
            0x00100040: ("CS", h["sex"]),
            0x00080021: ("DA", h["series_date"]),
            0x00080031: ("TM", h["series_time"]),
            0x00080022: ("DA", h["acq_date"]),
            0x00080032: ("TM", h["acq_times"][k]),
            0x00541300: ("DS", h["frt"]),
            0x00181242: ("IS", None if h["afd"] is None else h["afd"].split(".")[0].split("e")[0]),
            0x00541001: ("CS", h["units"]),
            0x00541006: ("CS", h["suv_type"]),
            0x00541102: ("CS", h["dc"]),
            0x00280051: ("CS", "\\".join(h["corrected"])),
            0x00281052: ("DS", h["intercept"]),
        }
        for tag, (vr, text) in fields.items():
            if text is not None:
                ds[tag] = raw(tag, vr, text)
        if h["items"]:
            item = Dataset()
            for tag, vr, text in ((0x00181074, "DS", h["dose"]), (0x00181075, "DS", h["half_life"]),
                                  (0x00181078, "DT", h["inj_dt"]), (0x00181072, "TM", h["inj_tm"])):
                if text is not None:
                    item[tag] = raw(tag, vr, text)
            ds.RadiopharmaceuticalInformationSequence = DicomSequence([item] * h["items"])
        if h["suvsf"] is not None or h["acsf"] is not None:
            block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
            for offset, text in ((0x00, h["suvsf"]), (0x09, h["acsf"])):
                if text is not None:
                    ds[block.get_tag(offset)] = raw(block.get_tag(offset), "DS", text)
        if h["ge"] is not None:
            block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
            ds[block.get_tag(0x0D)] = raw(block.get_tag(0x0D), "DT", h["ge"])

    write_image_series(np.full((3, 2, 2), BQML), np.diag([-4.0, -4.0, 3.0, 1.0]), folder, "PT", uid_seed="fuzz",
                       per_slice=per_slice)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=HEADERS)
def test_fuzzed_headers_give_finite_suv_or_a_documented_error(h: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pet, out_dir = Path(tmp) / "pet", Path(tmp) / "out"
        build(pet, h)
        out = out_dir / "suv.nii.gz"
        try:
            nii, side = suv_series.write_suv(pet, out, h["kind"], mbq_heuristic=h["mbq_heuristic"],
                                      allow_decay_none=h["allow_decay_none"])
        except (suv_errors.SuvError, DicomSeriesError) as err:
            assert str(err) and "\n" not in str(err)
            assert not out_dir.exists() or not any(out_dir.iterdir())
            return
        record = json.loads(side.read_text())
        assert len(record["factors"]) == 2
        assert all(math.isfinite(f) and f > 0 for f in record["factors"])
        data = np.asarray(nib.load(str(nii)).dataobj)
        assert np.all(np.isfinite(data)) and np.all(data > 0)
        np.testing.assert_allclose(data[0, 0, :], BQML * np.array(record["factors"]), rtol=1e-6)
        assert sorted(p.name for p in out_dir.iterdir()) == ["suv.json", "suv.nii.gz"]
