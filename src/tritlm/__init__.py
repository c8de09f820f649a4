"""tritlm: train, pack, export, run and serve ternary (1.58-bit) and binary (1-bit) LLMs."""

__version__ = "0.1.0"
