"""Registration of the TiMo classes with transformers' Auto classes (run once on `import timo_hf`)."""

from transformers import AutoBackbone, AutoConfig, AutoModel

from .configuration_timo import TiMoConfig
from .modeling_timo import TiMoBackbone, TiMoModel


def register_auto_classes() -> None:
    """Map `model_type="timo"` to the TiMo classes; safe to call more than once."""
    AutoConfig.register(TiMoConfig.model_type, TiMoConfig, exist_ok=True)
    for auto_class, model_class in ((AutoModel, TiMoModel), (AutoBackbone, TiMoBackbone)):
        auto_class.register(TiMoConfig, model_class, exist_ok=True)
