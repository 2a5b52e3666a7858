"""Where the tests find the repository and the real VOC photographs beside it."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Real VOC photographs and labels beside the project; tests that use them skip when absent.
VOC_SAMPLES = ROOT.parent / "shared" / "data" / "voc_samples"
