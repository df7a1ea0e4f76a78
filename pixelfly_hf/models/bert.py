"""Pixelfly BERT: BertModel, BertForSequenceClassification and BertForMaskedLM."""
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

from pixelfly_hf.models.base import PixelflyModelMixin
from pixelfly_hf.models.registry import Architecture, register_architecture
from pixelfly_hf.models.configs import PixelflyBertConfig


class PixelflyBertModel(PixelflyModelMixin, BertModel):
    config_class = PixelflyBertConfig


class PixelflyBertForSequenceClassification(PixelflyModelMixin, BertForSequenceClassification):
    config_class = PixelflyBertConfig


class PixelflyBertForMaskedLM(PixelflyModelMixin, BertForMaskedLM):
    config_class = PixelflyBertConfig


register_architecture(
    Architecture(
        name="bert",
        config_class=PixelflyBertConfig,
        roles={
            "attn": r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
            "mlp": r"encoder\.layer\.\d+\.(intermediate|output)\.dense",
        },
        models={
            BertModel: (PixelflyBertModel, AutoModel),
            BertForSequenceClassification: (PixelflyBertForSequenceClassification, AutoModelForSequenceClassification),
            BertForMaskedLM: (PixelflyBertForMaskedLM, AutoModelForMaskedLM),
        },
    )
)
