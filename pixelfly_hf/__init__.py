"""pixelfly_hf: Pixelfly (flat block butterfly + low-rank) layers for Hugging Face Transformers."""
from .patterns import FlatButterflyLayout, MatrixPlan, plan_matrix
from .layers import PixelflyLinear
from . import attention  # registers "pixelfly" with transformers
from .config import PixelflyConfig
from .mapping import get_model  # importing it registers the Pixelfly models with the Auto classes

__version__ = "0.1.0"
