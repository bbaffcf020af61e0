"""Importing the official `segment_anything` package where no torchvision loads.

`segment_anything` imports torchvision at package import for three helpers only: `resize` and
`to_pil_image` (used by `ResizeLongestSide.apply_image` on numpy images) and `batched_nms` /
`box_area` (used by the automatic mask generator). On machines with a working torchvision (GPU
machines) we import it and change nothing. Where torchvision is missing or broken (this machine: the
only wheel for torch 2.13.0 is a CUDA build whose ops do not register), `import_segment_anything`
puts small stand-in modules into `sys.modules` for the duration of the import only, then removes them.
`segment_anything` keeps references to the stand-in functions; nobody else can see them: afterwards
`import torchvision` fails as before, `importlib.util.find_spec("torchvision")` is None and
transformers' `is_torchvision_available()` stays False, so its image processors keep their
PIL/numpy code paths (tests check all three).

The stand-ins compute what torchvision computes for the inputs segment_anything gives them:
`to_pil_image` of an HxWx3 uint8 array is `Image.fromarray`, and `resize` of a PIL image to (h, w) is
PIL's bilinear resize (torchvision delegates PIL inputs to PIL), so pixels are identical. `nms` is a
plain greedy IoU suppression in torch.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

import numpy as np

_lock = threading.Lock()
_STUB_NAMES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
    "torchvision.ops.boxes",
)
#: How the last import was served: "torchvision" (a real one) or "stand-in".
mode: str | None = None


def _to_pil_image(pic: Any, mode: str | None = None):
    from PIL import Image

    if isinstance(pic, Image.Image):
        return pic
    arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # CHW tensor layout
        arr = np.transpose(arr, (1, 2, 0))
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)


def _resize(img: Any, size: Any, interpolation: Any = None, max_size: Any = None, antialias: Any = True):
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError("the torchvision stand-in resizes PIL images only (segment_anything passes PIL)")
    if isinstance(size, int):
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        size = (new_long, new_short) if w <= h else (new_short, new_long)
    h, w = int(size[0]), int(size[1])
    return img.resize((w, h), Image.BILINEAR)


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes, scores, iou_threshold: float):
    import torch

    order = torch.argsort(scores, descending=True)
    keep: list[int] = []
    area = _box_area(boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.as_tensor(keep, dtype=torch.long, device=boxes.device)


def _batched_nms(boxes, scores, idxs, iou_threshold: float):
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)  # separate categories so they never overlap
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _stand_in_modules() -> dict[str, types.ModuleType]:
    root = types.ModuleType("torchvision")
    root.__doc__ = "Lucid's import-time stand-in for segment_anything (never left in sys.modules)."
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = _resize
    functional.to_pil_image = _to_pil_image
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = _batched_nms
    boxes.box_area = _box_area
    boxes.nms = _nms
    root.transforms, transforms.functional, root.ops, ops.boxes = transforms, functional, ops, boxes
    return dict(zip(_STUB_NAMES, (root, transforms, functional, ops, boxes)))


def _real_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
        from torchvision.ops.boxes import batched_nms  # noqa: F401

        return True
    except Exception:  # missing, or a wheel whose compiled ops do not load
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def import_segment_anything() -> types.ModuleType:
    """The `segment_anything` package with its predictor and mask generator imported (see module doc)."""
    global mode
    with _lock:
        if "segment_anything.predictor" in sys.modules and mode is not None:
            return sys.modules["segment_anything"]
        if _real_torchvision():
            mode = "torchvision"
            return importlib.import_module("segment_anything")
        saved = {n: sys.modules[n] for n in _STUB_NAMES if n in sys.modules}
        sys.modules.update(_stand_in_modules())
        try:
            package = importlib.import_module("segment_anything")
            importlib.import_module("segment_anything.predictor")
            importlib.import_module("segment_anything.automatic_mask_generator")
        finally:
            for name in _STUB_NAMES:
                sys.modules.pop(name, None)
            sys.modules.update(saved)
            importlib.invalidate_caches()
        mode = "stand-in"
        return package
