"""timo_hf: TiMo, a spatiotemporal foundation model for satellite image time series, as transformers models.

Importing the package registers the TiMo classes with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoBackbone`, ...), so `AutoModel.from_pretrained(<timo folder>)` works after `import timo_hf`.
"""

from .auto_registration import register_auto_classes
from .band_adaptation import BandAdaptation, adapt_input_bands
from .configuration_timo import TiMoConfig
from .convert_original import ConversionReport, convert_original_checkpoint
from .image_processing_timo import TiMoImageProcessor
from .modeling_timo import (
    TiMoBackbone,
    TiMoForImageClassification,
    TiMoForSemanticSegmentation,
    TiMoModel,
    TiMoModelOutput,
    TiMoPreTrainedModel,
)
from .modeling_timo_mim import TiMoForMaskedImageModeling, TiMoMaskedImageModelingOutput


__version__ = "0.1.0.dev0"

register_auto_classes()

__all__ = [
    "TiMoConfig",
    "TiMoModel",
    "TiMoBackbone",
    "TiMoModelOutput",
    "TiMoPreTrainedModel",
    "TiMoForImageClassification",
    "TiMoForSemanticSegmentation",
    "TiMoForMaskedImageModeling",
    "TiMoMaskedImageModelingOutput",
    "TiMoImageProcessor",
    "BandAdaptation",
    "adapt_input_bands",
    "ConversionReport",
    "convert_original_checkpoint",
]
