"""From attention to places in the image: localization heads (discovery, cache), `locate`, and SAM.

Public surface: `HeadParams`, `HeadSelection`, `discover_heads`, `load_or_discover`, `spatial_entropy`,
`calibration_from_testbed`, `calibration_from_folder`, `LocateParams`, `Location`, `locate`, `locate_batch`;
SAM: `grounding.sam` (`load_segmenter`, `SamPrompt`, `SamMasks`) and `grounding.segment`.

Names resolve lazily (PEP 562), so `grounding.sam`'s prompt checks (used by the CLI before any model loads)
import no torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

_LAZY = {
    "CalibrationSet": "grounding.calibration",
    "Sample": "grounding.calibration",
    "calibration_from_folder": "grounding.calibration",
    "calibration_from_testbed": "grounding.calibration",
    "TESTBED_PARAMS": "grounding.heads",
    "HeadParams": "grounding.heads",
    "HeadScore": "grounding.heads",
    "HeadSelection": "grounding.heads",
    "default_params": "grounding.heads",
    "discover_heads": "grounding.heads",
    "elbow_threshold": "grounding.heads",
    "explicit_selection": "grounding.heads",
    "load_or_discover": "grounding.heads",
    "parse_heads": "grounding.heads",
    "spatial_entropy": "grounding.heads",
    "LocateParams": "grounding.locate",
    "Location": "grounding.locate",
    "box_and_point": "grounding.locate",
    "locate": "grounding.locate",
    "locate_batch": "grounding.locate",
}

if TYPE_CHECKING:
    from grounding.calibration import CalibrationSet, Sample, calibration_from_folder, calibration_from_testbed
    from grounding.heads import (
        TESTBED_PARAMS,
        HeadParams,
        HeadScore,
        HeadSelection,
        default_params,
        discover_heads,
        elbow_threshold,
        explicit_selection,
        load_or_discover,
        parse_heads,
        spatial_entropy,
    )
    from grounding.locate import LocateParams, Location, box_and_point, locate, locate_batch


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grounding' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `grounding.locate` the function (as `vlm.generate`): importing the submodule
    grounding/locate.py would otherwise bind the package attribute to the module of the same name."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "locate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "CalibrationSet",
    "HeadParams",
    "HeadScore",
    "HeadSelection",
    "LocateParams",
    "Location",
    "Sample",
    "TESTBED_PARAMS",
    "box_and_point",
    "calibration_from_folder",
    "calibration_from_testbed",
    "default_params",
    "discover_heads",
    "elbow_threshold",
    "explicit_selection",
    "load_or_discover",
    "locate",
    "locate_batch",
    "parse_heads",
    "spatial_entropy",
]
