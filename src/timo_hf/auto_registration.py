"""Registration of the TiMo classes with transformers' Auto classes (run once on `import timo_hf`).

Two mechanisms, both set up here:

- in-process: `AutoModel.from_pretrained(<timo folder>)` etc. resolve `model_type="timo"` after `import timo_hf`;
- remote code: every class is also registered for its Auto class, so `save_pretrained` / `push_to_hub` copy the
  TiMo module files into the folder and write an `auto_map` naming every Auto class they provide (see
  `TiMoPreTrainedModel.save_pretrained`); the folder then loads with `trust_remote_code=True` where timo_hf is not
  installed.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForSemanticSegmentation,
)

from .configuration_timo import TiMoConfig
from .image_processing_timo import TiMoImageProcessor
from .modeling_timo import TiMoBackbone, TiMoForImageClassification, TiMoForSemanticSegmentation, TiMoModel
from .modeling_timo_mim import TiMoForMaskedImageModeling


AUTO_CLASSES = (
    (AutoModel, TiMoModel),
    (AutoBackbone, TiMoBackbone),
    (AutoModelForImageClassification, TiMoForImageClassification),
    (AutoModelForSemanticSegmentation, TiMoForSemanticSegmentation),
    (AutoModelForMaskedImageModeling, TiMoForMaskedImageModeling),
)


def register_auto_classes() -> None:
    """Map `model_type="timo"` to the TiMo classes, in process and for remote code; safe to call more than once."""
    AutoConfig.register(TiMoConfig.model_type, TiMoConfig, exist_ok=True)
    TiMoConfig.register_for_auto_class()
    for auto_class, model_class in AUTO_CLASSES:
        auto_class.register(TiMoConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    # The processor is pure numpy/torch; it is registered under both backend names that AutoImageProcessor knows.
    AutoImageProcessor.register(
        TiMoConfig,
        image_processor_classes={"torchvision": TiMoImageProcessor, "pil": TiMoImageProcessor},
        exist_ok=True,
    )
    TiMoImageProcessor.register_for_auto_class()
