"""Which model, loaded how, and one call to generate. Knows nothing about particular methods.

Public surface: `load_vlm`, `build_inputs`, `generate`, `ask`, and the value types.

Names resolve lazily (PEP 562): `import vlm` and the input contract (`vlm.errors`, `vlm.images`,
`vlm.contract`, `vlm.checkpoint`) import no torch, so front ends check user input in milliseconds;
the first use of a model-side name (`vlm.load_vlm`, `from vlm import generate`) imports its module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from vlm.errors import (
    CheckpointError,
    ContextLengthError,
    ImageError,
    ImageTooLargeError,
    InputError,
    OutputError,
    QuestionError,
)
from vlm.images import ImageLimits, display_copy, load_image

# name -> module that defines it (imported on first access)
_LAZY = {
    "generate": "vlm.generate",
    "build_inputs": "vlm.inputs",
    "ImageGeometry": "vlm.layout",
    "ImageLayout": "vlm.layout",
    "ImageView": "vlm.layout",
    "TiledView": "vlm.layout",
    "TESTBED": "vlm.checkpoint",
    "VLM": "vlm.loader",
    "load_vlm": "vlm.loader",
    "Generation": "vlm.types",
    "SamplingParams": "vlm.types",
    "Timings": "vlm.types",
    "VLMInputs": "vlm.types",
}

if TYPE_CHECKING:
    from vlm.checkpoint import TESTBED
    from vlm.generate import generate
    from vlm.inputs import build_inputs
    from vlm.layout import ImageGeometry, ImageLayout, ImageView, TiledView
    from vlm.loader import VLM, load_vlm
    from vlm.types import Generation, SamplingParams, Timings, VLMInputs


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `vlm.generate` the function: importing the submodule vlm/generate.py first (directly, by
    any other module) would otherwise bind the package attribute to the module of the same name."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
