"""Pixelfly model classes, one module per architecture.

Importing this package registers the Pixelfly config classes (configs.py) with AutoConfig; an architecture's
model classes register with the Auto classes when its module is imported, which building one of its configs
does. `import_architectures()` imports them all (get_model needs every architecture to find the model's).
Adding an architecture = a config class in configs.py and one module here that calls `base.register_architecture`.
"""
import importlib
import pkgutil

from . import configs  # noqa: F401  (registers the config classes with AutoConfig)

_NOT_ARCHITECTURES = {"base", "configs"}


def import_architectures() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_ARCHITECTURES:
            importlib.import_module(f"{__name__}.{module.name}")
