"""The Pixelfly layers: PixelflyLinear (linear.py) and the "pixelfly" attention function (attention.py, imported on
its own: importing it registers the function with transformers)."""
from .linear import PixelflyLinear, dense_weight_of

__all__ = ["PixelflyLinear", "dense_weight_of"]
