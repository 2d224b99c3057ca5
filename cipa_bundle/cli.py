"""``cipa-bundle``: one verb per pipeline stage, each a thin wrapper over one library function.

Run ``cipa-bundle --help`` or ``cipa-bundle VERB --help``. Bad input ends with a one-line message and exit code 2.
Imports are deferred into each verb so ``cipa-bundle --help`` stays fast and a verb only needs its own dependencies.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["main", "Commands"]


def _name(value: Any) -> str | None:
    """A name from the command line (case id, SeriesInstanceUID): fire reads "12" as an int and "1.2" as a float."""
    return None if value is None else str(value)


class Commands:
    """CIPA PET-CT lung tumour segmentation (MONAI bundle) command line."""

    def summary(self, img_size: int = 512, dims: int = 96, batch: int = 1, forward: bool = False) -> dict[str, Any]:
        """Print the CIPA network's parameter count per part; with --forward, also time one forward pass.

        Args:
            img_size: square input side in pixels (the paper uses 512).
            dims: stage-0 width of the encoder (the paper uses 96).
            batch: batch size of the timed forward pass.
            forward: run a forward pass on random input and report its time and output shape.
        """
        from cipa_bundle.errors import CipaInputError
        from cipa_bundle.networks.summary import model_summary

        try:
            return model_summary(img_size=img_size, dims=dims, batch=batch, forward=forward)
        except ValueError as err:  # the network's own argument checks: here they are the user's arguments
            raise CipaInputError(f"summary: {err}") from err

    def demo(self, out_dir: str = "demo_output", cases: int = 8, epochs: int | None = None, seed: int = 0) -> None:
        """The main job: synthetic PET-CT studies -> bundle training -> predict on a held-out DICOM study -> Dice.

        Args:
            out_dir: where the dataset, checkpoints, TensorBoard logs and prediction outputs go.
            cases: phantom studies to generate (the last one is held out).
            epochs: training epochs (default from configs/demo.json).
            seed: phantom seed.
        """
        from cipa_bundle.demo import run_demo

        run_demo(out_dir=out_dir, cases=cases, epochs=epochs, seed=seed)

    def package(self, out: str, bundle_root: str | None = None, name: str | None = None, weights: bool = True) -> str:
        """Write a Model Zoo-style bundle zip that unpacks into NAME/ and runs with `python -m monai.bundle` there.

        Args:
            out: the .zip to write (atomically).
            bundle_root: the bundle folder to package (default: this checkout).
            name: top-level folder in the archive (default petct_lung_tumor_segmentation).
            weights: ship models/model.pt (and model.ts, model.onnx) when present (--noweights to leave them out).
        """
        from cipa_bundle.package import package_bundle

        return str(package_bundle(out, bundle_root, name=name, include_weights=weights))

    def import_official(self, checkpoint: str, out: str) -> str:
        """Convert the released official CIPA checkpoint (CIPA.pth) into this bundle's state_dict (models/model.pt)."""
        from cipa_bundle.networks.official import import_official_checkpoint

        return import_official_checkpoint(checkpoint, out)

    def suv(self, pet_dir: str, out: str, kind: str = "bw", allow_decay_none: bool = False) -> str:
        """Convert a PET DICOM series to SUV (NIfTI, native PET grid) plus a JSON provenance sidecar (suv.json).

        Args:
            pet_dir: folder holding the PET series.
            out: output .nii.gz (or .nii); the sidecar is written beside it with a .json extension.
            kind: bw (body weight, g/ml), lbm (SUL, Janmahasatian, g/ml) or bsa (Du Bois, cm2/ml).
            allow_decay_none: accept DecayCorrection NONE with the IBSI per-frame formula (refused by default).
        """
        from cipa_bundle.preprocessing.suv_series import write_suv

        return str(write_suv(pet_dir, out, kind, allow_decay_none=allow_decay_none)[0])

    def phantom(
        self,
        out_dir: str,
        cases: int = 1,
        seed: int = 0,
        shift: str = "0,0,0",
        vendor: str = "siemens",
        size: str = "small",
        noise: bool = True,
        blur: bool = True,
    ) -> list[str]:
        """Write synthetic PET-CT studies (DICOM CT + PET, label.nii.gz, truth.json) with exactly known truth.

        Args:
            out_dir: parent folder; cases go to OUT_DIR/phantom_000, phantom_001, ...
            cases: number of studies.
            seed: random seed (same seed -> same bytes).
            shift: "dx,dy,dz" mm (LPS): PET content displacement, as patient motion between CT and PET.
            vendor: siemens, ge or philips (timing tags and units of that vendor).
            size: small (CT 64x64x32), clinical (a thorax: CT 512x512x150, PET 4 mm) or whole_body (skull to
                mid-thigh: CT 512x512x350 at 3 mm, PET 4 mm).
            noise: add PET and CT noise (--nonoise for exact values).
            blur: blur the PET with a 6 mm FWHM PSF (--noblur for exact values).
        """
        from cipa_bundle.synthetic.phantom import make_phantom_dataset

        paths = make_phantom_dataset(out_dir, cases, seed, shift, vendor, size, noise, blur)
        return [str(p) for p in paths]

    def convert(
        self,
        study_dir: str,
        out_dir: str,
        register: str = "none",
        kind: str = "bw",
        studies_dir: str | None = None,
        case_id: str | None = None,
        label: str | None = None,
        ct_series: str | None = None,
        pet_series: str | None = None,
        label_rtstruct: str | None = None,
        roi: str | None = None,
        ct_window: str | None = None,
    ) -> dict[str, str]:
        """Convert a DICOM PET-CT study to ct/suv/suv_ct/image NIfTIs and provenance.json (PET resampled onto CT).

        Args:
            study_dir: folder holding one CT and one PET series (searched recursively).
            out_dir: output folder.
            register: none (same frame of reference, identity) or rigid (gated rigid PET->CT refinement).
            kind: SUV normalisation: bw (body weight), lbm (SUL) or bsa.
            studies_dir: also write a MONAI Label studies folder: STUDIES_DIR/CASE_ID.nii.gz (the fused image) and,
                with a label, STUDIES_DIR/labels/final/CASE_ID.nii.gz. An existing case with other content is refused.
            case_id: the case's name in STUDIES_DIR (default: the name of OUT_DIR).
            label: tumour mask NIfTI on the CT grid for STUDIES_DIR (default: OUT_DIR/label.nii.gz if it exists).
            ct_series: SeriesInstanceUID of the CT series, when the folder holds several CT volumes.
            pet_series: SeriesInstanceUID of the PET series, when the folder holds several PET series.
            label_rtstruct: an RTSTRUCT drawn on this CT: its ROI is rasterised onto the CT grid as
                OUT_DIR/label.nii.gz (voxel centres, even-odd rule), which datalist studies and STUDIES_DIR take.
            roi: the ROI (ROIName) of LABEL_RTSTRUCT, when it holds several.
            ct_window: LOW,HIGH in HU mapped to [0, 1] in image.nii.gz's CT channel (default -1200,-200, the lung
                window; -160,240 for soft tissue). Train and predict with the same window.
        """
        from cipa_bundle.preprocessing.convert import convert_study
        from cipa_bundle.preprocessing.transforms import DEFAULT_CT_WINDOW_HU

        window = DEFAULT_CT_WINDOW_HU if ct_window is None else ct_window  # convert_study validates it
        written = convert_study(study_dir, out_dir, register, kind, studies_dir=studies_dir, case_id=_name(case_id),
                                label=label, ct_series=_name(ct_series), pet_series=_name(pet_series),
                                label_rtstruct=label_rtstruct, roi=_name(roi), ct_window_hu=window)
        return {k: str(v) for k, v in written.items()}

    def predict(
        self,
        input: str,
        out_dir: str,
        checkpoint: str | None = None,
        pet: str | None = None,
        img_size: int | None = None,
        network_width: int | None = None,
        encoder_depths: list[int] | None = None,
        decoder_depths: list[int] | None = None,
        sw_batch_size: int | None = None,
        probabilities: bool = False,
        device: str | None = None,
        register: str = "none",
        kind: str = "bw",
        override: dict[str, Any] | None = None,
        keep_intermediate: bool = False,
        ct_series: str | None = None,
        pet_series: str | None = None,
        all_slices: bool = False,
        rtstruct: bool = False,
        store: bool = False,
        ct_window: str | None = None,
    ) -> dict[str, str]:
        """Segment lung tumours in one study: mask.nii.gz, seg.dcm (DICOM input), PNG overlays and report.json.

        Args:
            input: a DICOM study folder, a study on a DICOMweb server (dicomweb://HOST:PORT/PATH?study=STUDY_UID;
                credentials from CIPA_DICOMWEB_USER + CIPA_DICOMWEB_PASSWORD or CIPA_DICOMWEB_TOKEN), a fused
                2-channel image.nii.gz, a CT NIfTI (with --pet), "CT,PET" NIfTIs, or a folder with ct.nii.gz +
                suv.nii.gz (or autoPET's CTres.nii.gz + SUV.nii.gz).
            out_dir: output folder.
            checkpoint: CIPA state_dict (default models/model.pt of the bundle).
            pet: PET NIfTI in SUV when INPUT is a CT NIfTI in HU.
            img_size, network_width, encoder_depths, decoder_depths: network size (default: read from the checkpoint).
            sw_batch_size: slices per network call.
            probabilities: also write probabilities.nii.gz.
            device: torch device, e.g. cpu or cuda:0 (default CUDA when available).
            register: DICOM input: none or rigid PET->CT registration.
            kind: DICOM input: SUV normalisation bw, lbm or bsa.
            override: more inference.json ids, e.g. "{'min_lesion_ml': 0.5}".
            keep_intermediate: keep the converted inputs in OUT_DIR/intermediate.
            ct_series: DICOM input: SeriesInstanceUID of the CT series, when the study holds several CT volumes.
            pet_series: DICOM input: SeriesInstanceUID of the PET series, when the study holds several PET series.
            all_slices: run the network on every body slice, not only the lungs' range plus 2 cm.
            rtstruct: DICOM input: also write rtstruct.dcm, the mask's contours as an RTSTRUCT referencing the CT.
            store: DICOMweb input: store seg.dcm (and rtstruct.dcm) back into the study (STOW-RS), confirmed by QIDO-RS;
                the outputs stay in OUT_DIR either way.
            ct_window: LOW,HIGH in HU for the CT channel: the window the model was trained with (default -1200,-200,
                the lung window). A fused image must have been converted with it.
        """
        from cipa_bundle.errors import CipaInputError
        from cipa_bundle.inference.predict import predict
        from cipa_bundle.io.dicomweb import is_dicomweb_url

        options = dict(
            pet=pet, img_size=img_size, network_width=network_width, encoder_depths=encoder_depths,
            decoder_depths=decoder_depths, sw_batch_size=sw_batch_size, probabilities=probabilities, device=device,
            register=register, suv_kind=kind, overrides=override, keep_intermediate=keep_intermediate,
            ct_series=_name(ct_series), pet_series=_name(pet_series), all_slices=all_slices, rtstruct=rtstruct,
            ct_window_hu=ct_window,
        )
        if is_dicomweb_url(input):
            from cipa_bundle.inference.pacs import predict_dicomweb

            result = predict_dicomweb(input, out_dir, checkpoint, store=store, **options)
            return {**{k: str(v) for k, v in result.written.items()}, "stored": ",".join(result.stored)}
        if store:
            raise CipaInputError(f"predict: --store sends the SEG back to a DICOMweb study; {input} is not a "
                                 "dicomweb://HOST:PORT/PATH?study=STUDY_UID address")
        written = predict(input, out_dir, checkpoint, **options)
        return {k: str(v) for k, v in written.items()}

    def predict_studies(
        self,
        server: str,
        out_dir: str,
        studies: str | None = None,
        study_date: str | None = None,
        store: bool = False,
        checkpoint: str | None = None,
        device: str | None = None,
        register: str = "none",
        kind: str = "bw",
        sw_batch_size: int | None = None,
        override: dict[str, Any] | None = None,
        rtstruct: bool = False,
        all_slices: bool = False,
        ct_window: str | None = None,
    ) -> str:
        """Segment many studies of a DICOMweb server one after another; a re-run skips the studies already done.

        Writes OUT_DIR/<StudyInstanceUID>/ per study (as predict), OUT_DIR/manifest.json and OUT_DIR/summary.csv
        (study_uid, status, seconds, fetch_seconds, store_seconds, tumor_count, total_volume_ml, stored, error). A
        study that fails is recorded and the batch goes on; the command then ends with exit code 2 and names how many
        failed.

        Args:
            server: dicomweb://HOST:PORT/PATH (credentials from the environment, as for predict).
            out_dir: the batch folder.
            studies: a text file with one StudyInstanceUID per line (# comments allowed).
            study_date: instead of --studies, a StudyDate range searched by QIDO-RS: YYYYMMDD-YYYYMMDD.
            store: store each study's SEG (and RTSTRUCT) back into it.
            checkpoint, device, register, kind, sw_batch_size, override, rtstruct, all_slices, ct_window: as for
                predict.
        """
        import csv

        from cipa_bundle.errors import CipaInputError
        from cipa_bundle.inference.pacs import predict_studies

        summary = predict_studies(
            server, out_dir, checkpoint, studies=studies, study_date=_name(study_date), store=store,
            rtstruct=rtstruct, device=device, register=register, suv_kind=kind, sw_batch_size=sw_batch_size,
            overrides=override, all_slices=all_slices, ct_window_hu=ct_window,
        )
        with open(summary, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        failed = [row for row in rows if row["status"] != "done"]
        if failed:
            raise CipaInputError(f"predict_studies: {len(failed)} of {len(rows)} studies failed (first: "
                                 f"{failed[0]['study_uid']}: {failed[0]['error']}); see {summary}")
        return str(summary)

    def evaluate(
        self, pred: str, gt: str, out_dir: str = "eval", pred_name: str | None = None, gt_name: str | None = None
    ) -> dict[str, Any]:
        """Score predicted masks against ground truth: paper metrics + autoPET metrics -> metrics.csv, summary.json.

        Args:
            pred: a prediction NIfTI or a folder of them.
            gt: the ground-truth NIfTI or a folder of them (cases paired by file name).
            out_dir: where metrics.csv (one row per case) and summary.json are written.
            pred_name: with per-case sub-folders, the prediction file name in each (e.g. mask.nii.gz).
            gt_name: with per-case sub-folders, the ground-truth file name in each (e.g. label.nii.gz).
        """
        from cipa_bundle.metrics import evaluate_folder

        return evaluate_folder(pred, gt, out_dir, pred_name=pred_name, gt_name=gt_name)

    def datalist(
        self,
        source: str,
        root: str,
        out: str,
        val_fraction: float = 0.2,
        seed: int = 0,
        label_name: str = "label.nii.gz",
        test_list: str | None = None,
        slices: bool = False,
        tumour_free_fraction: float = 0.1,
    ) -> str:
        """Write a MONAI decathlon datalist JSON for a dataset folder (validation split by patient).

        Args:
            source: pclt20k (PNG slices + train.txt/test.txt), studies (convert output folders) or autopet.
            root: the dataset folder; paths in the JSON are relative to it.
            out: the JSON file to write.
            val_fraction: share of training patients held out for validation (never taken from the test list).
            seed: seeds the validation patients and the tumour-free slice choice.
            label_name: label file in each study folder (studies only).
            test_list: file of case or patient ids for the testing list (3-D sources).
            slices: expand 3-D training/validation cases into axial slice items.
            tumour_free_fraction: share of tumour-free slices kept with --slices.
        """
        from cipa_bundle.data.datalist import build_datalist

        return str(
            build_datalist(source, root, out, val_fraction, seed, label_name, test_list, slices, tumour_free_fraction)
        )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; ``argv`` (instead of ``sys.argv``) is for callers inside another process, whose
    allocator settings are then left alone."""
    import fire

    from cipa_bundle.errors import input_error_in
    from cipa_bundle.runtime import one_line_error, retain_freed_memory

    if argv is None:  # a whole process of its own (console script, python -m): see cipa_bundle.runtime
        retain_freed_memory()
    try:
        # An instance, not the class: fire's help for a class describes its constructor and lists no verbs.
        fire.Fire(Commands(), command=argv, name="cipa-bundle")
    except Exception as err:  # noqa: BLE001 - re-raised unless it carries an input error
        cause = input_error_in(err)
        if cause is None:
            raise
        print(one_line_error(cause), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
