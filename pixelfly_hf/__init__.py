"""pixelfly_hf: Pixelfly (flat block butterfly + low-rank) layers for Hugging Face Transformers.

Importing it registers the Pixelfly model types with the Auto classes and the "pixelfly" attention with
transformers, each as soon as transformers loads the module that needs it (registration.py), so the import itself
loads neither torch nor transformers. The layers, the planner and get_model load on first use.
"""
import importlib

from . import registration
from .config import PixelflyAttentionConfig, PixelflyConfig

registration.install()

__version__ = "0.1.0"

_LAZY = {
    "FlatButterflyLayout": "patterns",
    "MatrixPlan": "patterns",
    "plan_matrix": "patterns",
    "PixelflyLinear": "layers",
    "get_model": "mapping",
}

__all__ = ["PixelflyAttentionConfig", "PixelflyConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
