"""Benchmarks run by hand or with ``make bench``; not part of the test suite."""

import os

# transformers prints optional-dependency hints (torchvision) while being imported, before
# the benchmark can silence it: set its verbosity first, as ``app`` does.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
