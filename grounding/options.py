"""`NAME:k=v,...` specs of the segmentation methods (READ, VL-SAM) -> their frozen parameter dataclasses.

A dataclass here declares its fields with plain annotations (bool, int, float, str) and derives from
`PresetOptions` (its `presets()`, `from_preset(preset, **overrides)` and `changed()`); `parse_options` turns
the text into the `from_preset` call.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class PresetOptions:
    """A frozen options dataclass with a `preset` field and named presets (`presets()`: preset -> the
    values that differ from the dataclass defaults)."""

    preset: str

    @classmethod
    def presets(cls) -> dict[str, dict]:
        raise NotImplementedError

    @classmethod
    def from_preset(cls, preset: str = "official", **overrides):
        presets = cls.presets()
        if preset not in presets:
            raise ValueError(f"preset must be one of {', '.join(presets)}, got {preset!r}")
        return cls(**{**presets[preset], "preset": preset, **overrides})

    def changed(self) -> dict:
        """The values that differ from the preset's (what a `NAME:...` spec would need to name)."""
        base = type(self).from_preset(self.preset)
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)}


def parse_options(spec: str, name: str, cls: type) -> Any:
    """'NAME' or 'NAME:k=v,...' (e.g. 'read:token=last,layer=3', 'vl-sam:preset=paper') -> `cls` at the
    spec's preset (default "official") with the given values.

    Raises:
        ValueError: another method name, an unknown option, or a bad value (the message names it).
    """
    head, _, body = spec.partition(":")
    if head.strip() != name:
        raise ValueError(f"not a {name} spec: {spec!r}")
    types = {f.name: f.type for f in fields(cls)}
    values: dict = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise ValueError(f"{name}: unknown option {part!r} (options: {', '.join(types)})")
        kind = types[key]
        try:
            if kind == "bool":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                values[key] = raw.lower() in ("true", "1")
            elif kind == "int":
                values[key] = int(raw)
            elif kind == "float":
                values[key] = float(raw)
            else:
                values[key] = raw
        except ValueError:
            raise ValueError(f"{name}: {key} must be {kind}, got {raw!r}") from None
    preset = values.pop("preset", "official")
    return cls.from_preset(preset, **values)


__all__ = ["PresetOptions", "parse_options"]
