"""Calibration sets for head discovery: (image, referring phrase) pairs with a stable name.

Two builders: the testbed's shapes world (scenes from `testbed.world.scenes.scenes`, one phrase "the {colour}
{shape}" per object whose category is unique in its scene) and a folder described by a JSON-lines file,
one object per line: {"image": "photos/dog.jpg", "phrase": "the dog on the left"} (image paths relative
to the file's directory, or absolute). The name enters the head cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlm.inputs import ImageLike

#: Calibration defaults for the embedded world: a seed no evaluation uses (evaluation: 12345, 777).
TESTBED_SEED = 4242
TESTBED_SCENES = 200


@dataclass(frozen=True)
class Sample:
    """One calibration pair: an image (PIL, path or [H, W, 3] uint8 array) and a referring phrase."""

    image: ImageLike = field(repr=False, compare=False)
    phrase: str


@dataclass(frozen=True)
class CalibrationSet:
    """Named samples. `name` identifies the set in the head cache (same name, same samples)."""

    name: str
    samples: tuple[Sample, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"calibration set {self.name!r} has no samples")

    def __len__(self) -> int:
        return len(self.samples)


def calibration_from_testbed(seed: int = TESTBED_SEED, n_scenes: int = TESTBED_SCENES) -> CalibrationSet:
    """Scenes `testbed.world.scenes.scenes(seed, n_scenes, WorldConfig())`; one sample "the {colour} {shape}"
    per visible object whose category is unique in its scene (a referring phrase names one object)."""
    from testbed.world.scenes import WorldConfig, referable_objects, scenes

    samples = []
    for scene in scenes(seed, n_scenes, WorldConfig()):
        for o in referable_objects(scene):
            samples.append(Sample(scene.image, f"the {o.color} {o.shape}"))
    return CalibrationSet(f"testbed:seed={seed}:scenes={n_scenes}", tuple(samples))


def calibration_from_folder(jsonl: str | os.PathLike) -> CalibrationSet:
    """Samples from a JSON-lines file of {"image": PATH, "phrase": TEXT} (blank lines skipped).

    Raises:
        FileNotFoundError: the file, or an image it names, does not exist.
        ValueError: a line is not a JSON object with string "image" and "phrase".
    """
    path = Path(jsonl).expanduser().resolve()
    raw = path.read_bytes()
    samples = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("phrase"), str):
            raise ValueError(f'{path}:{n}: expected {{"image": "path", "phrase": "text"}}, got {line.strip()[:80]!r}')
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{n}: image {image} does not exist")
        samples.append(Sample(image, row["phrase"]))
    return CalibrationSet(f"folder:{path}:{hashlib.sha256(raw).hexdigest()[:12]}", tuple(samples))
