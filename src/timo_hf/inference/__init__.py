"""Whole-scene inference for the `timo` command line: inputs -> scene -> tiles -> model -> blended GeoTIFFs.

One job per module: `inputs` (what the user passed: files, folder, JSON, stack; dates), `scene` (windowed,
grid-checked reading), `tiling` (tile grid and seam-free streaming blend), `tile_models` (model + image processor on
a batch of tiles), `writer` (COG output under a temporary name), `quicklook` (PNG with legend), `loading` (model
folders and their image processor), `pipeline` (the runs: `predict_scene`, `embed_scene`).
"""

from .inputs import InputFrame, resolve_inputs
from .loading import inference_processor, load_encoder, load_processor, load_segmentation_model
from .pipeline import InferenceSummary, embed_scene, predict_scene
from .scene import Scene
from .tile_models import TileEmbedder, TileSegmenter, pick_device
from .tiling import BlendAccumulator, TileGrid, blend_weights


__all__ = [
    "BlendAccumulator",
    "InferenceSummary",
    "InputFrame",
    "Scene",
    "TileEmbedder",
    "TileGrid",
    "TileSegmenter",
    "blend_weights",
    "embed_scene",
    "inference_processor",
    "load_encoder",
    "load_processor",
    "load_segmentation_model",
    "pick_device",
    "predict_scene",
    "resolve_inputs",
]
