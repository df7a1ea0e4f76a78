from .linear import PixelflyLinear, dense_weight_of

__all__ = ["PixelflyLinear", "dense_weight_of"]
