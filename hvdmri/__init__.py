"""hvdmri: train brain MRI tumor classifiers data-parallel with Horovod on CPU nodes."""

__version__ = "0.1.0"
