"""Which model, loaded how, and one call to generate. Knows nothing about particular methods.

Public surface: `load_vlm`, `build_inputs`, `generate`, `ask`, and the value types.
"""

from vlm.generate import generate
from vlm.inputs import ImageError, build_inputs, load_image
from vlm.layout import ImageGeometry, ImageLayout
from vlm.loader import TESTBED, VLM, CheckpointError, load_vlm
from vlm.types import Generation, SamplingParams, Timings, VLMInputs

__all__ = [
    "TESTBED",
    "VLM",
    "CheckpointError",
    "Generation",
    "ImageError",
    "ImageGeometry",
    "ImageLayout",
    "SamplingParams",
    "Timings",
    "VLMInputs",
    "build_inputs",
    "generate",
    "load_image",
    "load_vlm",
]
