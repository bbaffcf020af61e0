"""Write testbed scenes to disk: PNGs plus `scenes.jsonl` with objects, boxes and COCO RLE masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from rich.progress import track

from testbed.world.scenes import WorldConfig, scenes


def encode_mask(mask: np.ndarray) -> dict:
    """[H, W] bool -> COCO RLE with a str `counts` (JSON-able)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def render_dataset(out: str | Path, n: int, seed: int, cfg: WorldConfig = WorldConfig()) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "scenes.jsonl").open("w") as f:
        for i, s in enumerate(track(scenes(seed, n, cfg), total=n, description="rendering")):
            name = f"scene_{i:05d}.png"
            s.image.save(out / name)
            record = {
                "file": name,
                "seed": s.seed,
                "width": s.image.width,
                "height": s.image.height,
                "background": s.background,
                "objects": [
                    {
                        "shape": o.shape,
                        "color": o.color,
                        "rgb": list(o.rgb),
                        "bbox": list(o.bbox),
                        "area": int(o.mask.sum()),
                        "mask": encode_mask(o.mask),
                    }
                    for o in s.objects
                ],
            }
            f.write(json.dumps(record) + "\n")
    return out
