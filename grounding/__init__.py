"""From attention to places in the image: localization heads (discovery, cache), `locate`, and SAM.

Public surface: `HeadParams`, `HeadSelection`, `discover_heads`, `load_or_discover`, `spatial_entropy`,
`calibration_from_testbed`, `calibration_from_folder`, `LocateParams`, `Location`, `locate`, `locate_batch`;
SAM: `grounding.sam` (`load_segmenter`, `SamPrompt`, `SamMasks`) and `grounding.segment`; READ's similarity-as-points:
`grounding.read`; VL-SAM's attention flow (open-ended): `grounding.vlsam`.

Names resolve lazily (PEP 562), so `grounding.sam`'s prompt checks (used by the CLI before any model loads)
import no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

# submodule -> the names it defines, imported on first access (lazy_loader, PEP 562)
__getattr__, __dir__, _lazy_all = lazy_loader.attach(
    __name__,
    submod_attrs={
        "calibration": ["CalibrationSet", "Sample", "calibration_from_folder", "calibration_from_testbed"],
        "heads": [
            "TESTBED_PARAMS",
            "HeadParams",
            "HeadScore",
            "HeadSelection",
            "default_params",
            "discover_heads",
            "elbow_threshold",
            "explicit_selection",
            "load_or_discover",
            "parse_heads",
            "spatial_entropy",
        ],
        "location": ["LocateParams", "Location", "box_and_point", "locate", "locate_batch"],
    },
)

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
    from grounding.location import LocateParams, Location, box_and_point, locate, locate_batch

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
