"""Pixelfly model classes, one module per architecture.

Importing this package registers the Pixelfly config classes (configs.py) with AutoConfig; an architecture's
model classes register with the Auto classes when its module is imported, which building one of its configs
does. `import_architectures()` imports them all (get_model needs every architecture to find the model's).
Adding an architecture = a config class in configs.py naming its `architecture_module`, and that module here,
which calls `registry.register_architecture`. The rest: the model mixin (base.py), the layer installer
(install.py), the model card (card.py).
"""
import importlib

from .configs import CONFIG_CLASSES  # importing configs registers the config classes with AutoConfig


def import_architectures() -> None:
    for config_class in CONFIG_CLASSES:
        importlib.import_module(config_class.architecture_module)
