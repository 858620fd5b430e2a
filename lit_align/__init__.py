"""lit_align: Lightning modules for aligning code-generation language models on unit-test feedback."""

__version__ = "0.1.0"
