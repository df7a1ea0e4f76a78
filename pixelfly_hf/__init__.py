"""pixelfly_hf: Pixelfly (flat block butterfly + low-rank) layers for Hugging Face Transformers."""
from .patterns import FlatButterflyLayout, MatrixPlan, plan_matrix
from .layers import PixelflyLinear
from . import attention  # registers "pixelfly" with transformers

__version__ = "0.1.0"
