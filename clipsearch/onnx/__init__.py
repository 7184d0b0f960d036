"""ONNX Runtime towers: the CPU fast paths, each self-checked against torch before it is used.

`runtime.py` holds what both towers share (session options, the export call, the cache key, the
self-check, `OnnxTowerEncoder`, the fall-back-to-torch policy); `text.py` and `image.py` the exports
themselves. Which runtime a tower gets is decided in one place, `clipsearch.encoder.build_encoder`.
"""

from clipsearch.onnx.image import build_onnx_image, maybe_onnx_image
from clipsearch.onnx.runtime import OnnxTowerEncoder, Runtime, Tower, cache_key
from clipsearch.onnx.text import build_onnx_text, maybe_onnx_text, text_tower_kind

__all__ = ["OnnxTowerEncoder", "Runtime", "Tower", "build_onnx_image", "build_onnx_text", "cache_key",
           "maybe_onnx_image", "maybe_onnx_text", "text_tower_kind"]
