"""From attention to places in the image: localization heads (discovery, cache) and `locate`.

Public surface: `HeadParams`, `HeadSelection`, `discover_heads`, `load_or_discover`, `spatial_entropy`,
`calibration_from_testbed`, `calibration_from_folder`, `LocateParams`, `Location`, `locate`, `locate_batch`.
"""

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

__all__ = [
    "TESTBED_PARAMS",
    "CalibrationSet",
    "HeadParams",
    "HeadScore",
    "HeadSelection",
    "LocateParams",
    "Location",
    "Sample",
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
