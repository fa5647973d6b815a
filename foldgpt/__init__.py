"""FoldGPT: fold a causal LM, export it for phones, measure it. The top of the import graph."""

__version__ = "0.1.0"
