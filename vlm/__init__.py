"""Which model, loaded how, and one call to generate. Knows nothing about particular methods.

Public surface: `load_vlm`, `build_inputs`, `generate` (vlm/decoding.py), the value types and the input contract.

Names resolve lazily (PEP 562): `import vlm` and the input contract (`lucid.errors`, `vlm.images`,
`vlm.contract`, `vlm.checkpoint`) import no torch, so front ends check user input in milliseconds;
the first use of a model-side name (`vlm.load_vlm`, `from vlm import generate`) imports its module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

from lucid.errors import (
    CheckpointError,
    ContextLengthError,
    ImageError,
    ImageTooLargeError,
    InputError,
    OutputError,
    QuestionError,
)
from vlm.images import ImageLimits, display_copy, load_image

# submodule -> the names it defines, imported on first access (lazy_loader, PEP 562)
__getattr__, __dir__, _lazy_all = lazy_loader.attach(
    __name__,
    submod_attrs={
        "checkpoint": ["TESTBED"],
        "decoding": ["generate"],
        "inputs": ["build_inputs"],
        "layout": ["ImageGeometry", "ImageLayout", "ImageView", "TiledView"],
        "loader": ["VLM", "load_vlm"],
        "types": ["Generation", "SamplingParams", "Timings", "VLMInputs"],
    },
)

if TYPE_CHECKING:
    from vlm.checkpoint import TESTBED
    from vlm.decoding import generate
    from vlm.inputs import build_inputs
    from vlm.layout import ImageGeometry, ImageLayout, ImageView, TiledView
    from vlm.loader import VLM, load_vlm
    from vlm.types import Generation, SamplingParams, Timings, VLMInputs

__all__ = [
    "TESTBED",
    "VLM",
    "CheckpointError",
    "ContextLengthError",
    "Generation",
    "ImageError",
    "ImageGeometry",
    "ImageTooLargeError",
    "ImageLayout",
    "ImageLimits",
    "ImageView",
    "InputError",
    "OutputError",
    "QuestionError",
    "SamplingParams",
    "TiledView",
    "Timings",
    "VLMInputs",
    "build_inputs",
    "display_copy",
    "generate",
    "load_image",
    "load_vlm",
]
