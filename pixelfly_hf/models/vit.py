"""Pixelfly ViT (transformers >= 5.9 layout: layers[i].attention.{q,k,v,o}_proj, layers[i].mlp.{fc1,fc2})."""
from transformers import AutoModel, AutoModelForImageClassification, ViTForImageClassification, ViTModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from pixelfly_hf.models.base import PixelflyModelMixin
from pixelfly_hf.models.registry import Architecture, register_architecture
from pixelfly_hf.models.configs import PixelflyViTConfig


class PixelflyViTModel(PixelflyModelMixin, ViTModel):
    config_class = PixelflyViTConfig


class PixelflyViTForImageClassification(PixelflyModelMixin, ViTForImageClassification):
    config_class = PixelflyViTConfig


# transformers renames ViT checkpoint keys to the >= 5.9 layout on load (and back on save) for its own classes;
# give the top-level PixelflyViTModel the same renaming so its checkpoints match ViTForImageClassification's.
register_checkpoint_conversion_mapping(
    PixelflyViTModel.__name__, get_checkpoint_conversion_mapping(ViTModel.__name__), overwrite=True
)

register_architecture(
    Architecture(
        name="vit",
        config_class=PixelflyViTConfig,
        roles={"attn": r"layers\.\d+\.attention\.[qkvo]_proj", "mlp": r"layers\.\d+\.mlp\.fc[12]"},
        models={
            ViTModel: (PixelflyViTModel, AutoModel),
            ViTForImageClassification: (PixelflyViTForImageClassification, AutoModelForImageClassification),
        },
    )
)
