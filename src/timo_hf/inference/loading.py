"""Loading a TiMo model folder (or Hub id) and its image processor for the command line, with clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

from transformers import AutoConfig

from ..configuration_timo import TiMoConfig
from ..image_processing_timo import TiMoImageProcessor
from ..modeling_timo import TiMoBackbone, TiMoForImageClassification, TiMoForSemanticSegmentation, TiMoModel
from ..modeling_timo_mim import TiMoForMaskedImageModeling


PROCESSOR_FILE = "preprocessor_config.json"
MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (TiMoModel, TiMoBackbone, TiMoForImageClassification, TiMoForSemanticSegmentation,
                TiMoForMaskedImageModeling)
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_local(reference: str | os.PathLike) -> bool:
    """A path that exists, or anything that cannot be a Hub repository id ("user/name")."""
    return Path(reference).expanduser().exists() or not _HUB_ID.match(str(reference))


def load_config(reference: str | os.PathLike) -> TiMoConfig:
    """The TiMo config of a folder or Hub id; FileNotFoundError / ValueError when it is missing or not TiMo."""
    if _is_local(reference):
        folder = Path(reference).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json; is it a save_pretrained folder?")
    try:
        config = AutoConfig.from_pretrained(str(reference))
    except OSError as error:
        raise FileNotFoundError(
            f"{reference} is neither a model folder nor a Hub repository that can be loaded: {error}"
        ) from None
    if not isinstance(config, TiMoConfig):
        raise ValueError(f"{reference} holds a {type(config).__name__} (model_type {config.model_type!r}), not TiMo")
    return config


def architecture(config: TiMoConfig) -> str:
    return (config.architectures or ["TiMoModel"])[0]


def load_processor(reference: str | os.PathLike, processor: str | os.PathLike | None = None) -> TiMoImageProcessor:
    """The image processor saved with the model (or at `processor`): band order, normalisation, dates encoding."""
    source = processor if processor is not None else reference
    if _is_local(source):
        folder = Path(source).expanduser()
        if folder.is_file() and folder.name.endswith(".json"):
            return TiMoImageProcessor.from_json_file(folder)
        if not (folder / PROCESSOR_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} has no {PROCESSOR_FILE}: the image processor that fixes the model's band order and "
                "normalisation is missing. Save the one used for training next to the model "
                f"(TiMoImageProcessor(...).save_pretrained('{folder}')) or pass --processor <folder or json>"
            )
    try:
        return TiMoImageProcessor.from_pretrained(str(source))
    except OSError as error:
        raise FileNotFoundError(f"cannot load the image processor of {source}: {error}") from None


def inference_processor(processor: TiMoImageProcessor) -> TiMoImageProcessor:
    """A copy that only normalises: every frame (none dropped for missing pixels: every tile keeps the scene's
    dates), no resize, crop or frame padding (tiles are cut by the caller)."""
    settings = processor.to_dict()
    settings.pop("image_processor_type", None)
    settings.update(size=None, crop_size=None, random_crop=False, temporal_sampling="all", pad_frames=False,
                    min_valid_fraction=None)
    return TiMoImageProcessor(**settings)


def load_segmentation_model(reference: str | os.PathLike) -> TiMoForSemanticSegmentation:
    config = load_config(reference)
    name = architecture(config)
    if name != TiMoForSemanticSegmentation.__name__:
        raise ValueError(
            f"{reference} is a {name}; timo predict needs a TiMoForSemanticSegmentation (fine-tune one with "
            "training/finetune.py, or use timo embed for encoder features)"
        )
    return TiMoForSemanticSegmentation.from_pretrained(str(reference), config=config).eval()


def load_encoder(reference: str | os.PathLike) -> TiMoModel:
    """The TiMo encoder of any TiMo folder (bare model, backbone, classification, segmentation or MIM): the folder's
    own class is loaded (no unexpected-weight report) and its `TiMoModel` returned."""
    model = load_any_model(reference)
    return model if isinstance(model, TiMoModel) else model.timo


def load_any_model(reference: str | os.PathLike):
    """The class named in the folder's `architectures` (a TiMoModel when none is named), in eval mode."""
    config = load_config(reference)
    cls = MODEL_CLASSES.get(architecture(config))
    if cls is None:
        raise ValueError(f"{reference}: unknown TiMo architecture {architecture(config)!r}")
    return cls.from_pretrained(str(reference), config=config).eval()
