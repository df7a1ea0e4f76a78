"""pixelfly_hf: Pixelfly (flat block butterfly + low-rank) layers for Hugging Face Transformers.

Importing it registers the Pixelfly model types with the Auto classes (their model classes load when a Pixelfly
config is built) and the "pixelfly" attention with transformers (once transformers' modeling code loads, see
attention_hook.py). The layers, the planner and get_model load on first use: they pull in torch's compiler stack
and the Triton kernels, which a script that only loads or configures a model should not pay for at import.
"""
import importlib

from . import attention_hook, models  # noqa: F401  (models registers the Pixelfly config types with AutoConfig)
from .config import PixelflyAttentionConfig, PixelflyConfig

attention_hook.install()

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
