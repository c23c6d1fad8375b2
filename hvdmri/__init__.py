"""hvdmri: train brain MRI tumor classifiers data-parallel with Horovod on CPU nodes."""

import os

__version__ = "0.1.0"

# TensorFlow's C++ start-up notes (oneDNN, CPU instructions) would open every
# command's output, --help included; warnings and errors still show. Set before
# any submodule imports TensorFlow, and only where the user has not chosen a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
