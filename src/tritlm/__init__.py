"""tritlm: train, pack, export, run and serve ternary (1.58-bit) and binary (1-bit) LLMs."""

__version__ = "0.1.0"


def load(path, device="cpu", kv_dtype="auto"):
    """Load any model tritlm can read, on ``device``; see :func:`tritlm.api.load`."""
    from tritlm.api import load as _load

    return _load(path, device, kv_dtype)


__all__ = ["load", "__version__"]
