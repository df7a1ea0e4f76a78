"""Pixelfly model classes, one module per architecture; importing this package registers them all.

Adding an architecture = adding one module here that calls `base.register_architecture`.
"""
import importlib
import pkgutil

from .base import ARCHITECTURES, Architecture, PixelflyModelMixin, register_architecture, supported_classes

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ARCHITECTURES", "Architecture", "PixelflyModelMixin", "register_architecture", "supported_classes"]
