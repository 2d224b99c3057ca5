"""The CIPA network and its building blocks (no DICOM, no I/O beyond weight files)."""
