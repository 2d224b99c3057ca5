"""Synthetic PET-CT studies with analytic truth, off the clinical data path.

* :mod:`~cipa_bundle.synthetic.phantom`: the thorax phantom (anatomy, partial-volume rasterisation, PET timing and
  vendor encodings) and the studies it writes;
* :mod:`~cipa_bundle.synthetic.dicom_writer`: DICOM series as the three PET vendors and a CT scanner write them;
* :mod:`~cipa_bundle.synthetic.dataset`: the embedded training set ``configs/train.json`` builds on first use.

The demo, the tests and the benchmarks use it; prediction on real studies never imports it.
"""
