"""Segment-anything behind one small interface, with two real backends.

* `OfficialSam`: the `segment_anything` package (`SamPredictor`), for official `.pth` checkpoints
  (`vit_b:PATH`, `vit_l:PATH`, `vit_h:PATH`) and for official-architecture SAMs of any size saved by
  `grounding.sam_model.save_sam` (the embedded testbed SAM). Imported through `grounding.sam_import`
  where torchvision does not load.
* `HfSam`: transformers' `SamModel` / `SamProcessor`, for HF-format directories (the facebook/sam-vit-*
  layout), `hf:DIR`.

Both take the same `SamPrompt`s and return the same `SamMasks`. Conventions (Lucid's everywhere):
images are RGB; a point is a pixel (x = column, y = row, SAM's own convention); a box is
(x0, y0, x1, y1) in ORIGINAL pixels with exclusive x1, y1 (the pixel edges; the backend converts to
SAM's inclusive corners). Each backend keeps the image embeddings of the last few images, keyed by a
hash of the pixels, so several prompt rounds on one image encode it once.

Which SAM a spec string names (`testbed`, `vit_b:PATH`, `hf:DIR`, a DIR, ...) is decided in one place, the
`SAM_BACKENDS` registry (one `SamBackend` per kind: prefix, help, torch-free check, loader; modelled on
segment-anything's `sam_model_registry`): `parse_sam_spec`, `check_sam_spec`, `load_segmenter` and the
`SAM_HELP` the CLI shows all come from it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lucid.errors import CheckpointError, InputError

TESTBED_SAM = Path(__file__).resolve().parent.parent / "testbed" / "weights" / "tiny-sam"


class PromptError(InputError):
    """A SAM prompt that cannot be honoured (a point outside the image, an empty box, ...)."""


@dataclass(frozen=True)
class SamPrompt:
    """One object to segment.

    Attributes:
        points: (x, y) pixels (column, row) in the original image.
        labels: 1 = on the object, 0 = not on it; one per point.
        box: (x0, y0, x1, y1) original pixels, x1 / y1 exclusive; or None.
        mask_input: low-res logits from an earlier `SamMasks.low_res[i]` to refine, or None.
        multimask: three candidate masks (SAM's advice for a lone point, which is ambiguous) or one;
            None chooses that way.
    """

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    mask_input: np.ndarray | None = field(default=None, compare=False)
    multimask: bool | None = None

    def __post_init__(self) -> None:
        if len(self.points) != len(self.labels):
            raise PromptError(f"{len(self.points)} points but {len(self.labels)} labels")
        if any(lab not in (0, 1) for lab in self.labels):
            raise PromptError(f"point labels must be 0 or 1, got {list(self.labels)}")
        if not self.points and self.box is None:
            raise PromptError("a SAM prompt needs at least one point or a box")

    @property
    def wants_multimask(self) -> bool:
        if self.multimask is not None:
            return self.multimask
        return len(self.points) == 1 and self.box is None and self.mask_input is None

    def check(self, width: int, height: int) -> None:
        """Raise `PromptError` if a point or the box lies outside a width x height image."""
        for x, y in self.points:
            if not (0 <= x < width and 0 <= y < height):
                raise PromptError(f"point ({x:g}, {y:g}) lies outside the {width}x{height} image")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise PromptError(
                    f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must satisfy 0 <= x0 < x1 <= {width}, "
                    f"0 <= y0 < y1 <= {height}"
                )

    def sam_box(self) -> np.ndarray | None:
        """SAM's inclusive-corner box."""
        if self.box is None:
            return None
        x0, y0, x1, y1 = self.box
        return np.array([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], dtype=np.float64)


@dataclass(frozen=True)
class SamMasks:
    """SAM's answer for one prompt: K candidate masks (K = 3 for multimask, else 1).

    Attributes:
        masks: [K, H, W] bool at the original resolution.
        scores: [K] the IoU head's predicted quality.
        low_res: [K, h, w] float logits (feed one back as `SamPrompt.mask_input`).
    """

    masks: np.ndarray = field(repr=False)
    scores: np.ndarray
    low_res: np.ndarray = field(repr=False)

    @property
    def best(self) -> int:
        return int(np.argmax(self.scores))

    @property
    def mask(self) -> np.ndarray:
        return self.masks[self.best]

    @property
    def score(self) -> float:
        return float(self.scores[self.best])

    def boxes(self) -> np.ndarray:
        """[K, 4] tight (x0, y0, x1, y1) boxes of the masks (x1, y1 exclusive; zeros for an empty mask)."""
        return np.array([mask_box(m) for m in self.masks], dtype=np.float64)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def image_array(image) -> np.ndarray:
    """HxWx3 uint8 RGB from a PIL image or an array."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"SAM needs an HxWx3 uint8 RGB image, got shape {arr.shape} dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def image_hash(arr: np.ndarray) -> str:
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()


class _EmbeddingCache:
    def __init__(self, size: int = 8):
        self.size = size
        self.items: OrderedDict[str, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key: str, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class Segmenter:
    """The interface: `segment(image, prompts) -> [SamMasks]`, one per prompt, in order.

    Thread-safe (one lock per backend); `timings` of the last call: "embed" (0 when cached) and
    "decode" seconds.
    """

    name: str = "sam"
    source: str = ""

    def __init__(self, cache_size: int = 8):
        self._cache = _EmbeddingCache(cache_size)
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    @property
    def cache_stats(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses, "size": len(self._cache.items)}

    def segment(self, image, prompts: Sequence[SamPrompt]) -> list[SamMasks]:
        import torch

        arr = image_array(image)
        h, w = arr.shape[:2]
        for p in prompts:
            p.check(w, h)
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            key = image_hash(arr)
            state = self._cache.get(key)
            if state is None:
                state = self._embed(arr)
                self._cache.put(key, state)
            t1 = time.perf_counter()
            out = self._decode(state, list(prompts))
            self.timings = {"embed": t1 - t0, "decode": time.perf_counter() - t1}
        return out

    def _embed(self, arr: np.ndarray):  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, state, prompts: list[SamPrompt]) -> list[SamMasks]:  # pragma: no cover - abstract
        raise NotImplementedError


def _groups(prompts: list[SamPrompt]) -> dict[tuple, list[int]]:
    """Prompts that can share one batched decoder call: same point count, box / mask presence, outputs."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        key = (len(p.points), p.box is not None, p.mask_input is not None, p.wants_multimask)
        groups.setdefault(key, []).append(i)
    return groups


class OfficialSam(Segmenter):
    """`segment_anything.SamPredictor` on an official-architecture `Sam` (prompts batched via `predict_torch`)."""

    name = "segment-anything"

    def __init__(self, model, source: str = "", cache_size: int = 8):
        from grounding.sam_import import import_segment_anything

        super().__init__(cache_size)
        sa = import_segment_anything()
        self.model = model.eval()
        self.predictor = sa.SamPredictor(self.model)
        self.source = source

    def _embed(self, arr: np.ndarray):
        self.predictor.set_image(arr)
        return (self.predictor.features, self.predictor.original_size, self.predictor.input_size)

    def _decode(self, state, prompts: list[SamPrompt]) -> list[SamMasks]:
        import torch

        pr = self.predictor
        pr.features, pr.original_size, pr.input_size = state
        pr.is_image_set = True
        dev = pr.device
        out: list[SamMasks | None] = [None] * len(prompts)
        for (n_pts, has_box, has_mask, multi), idx in _groups(prompts).items():
            group = [prompts[i] for i in idx]
            coords = labels = boxes = masks_in = None
            if n_pts:
                pts = np.array([p.points for p in group], dtype=np.float64)  # [N, k, 2]
                coords = torch.as_tensor(
                    pr.transform.apply_coords(pts, pr.original_size), dtype=torch.float, device=dev
                )
                labels = torch.as_tensor(np.array([p.labels for p in group]), dtype=torch.int, device=dev)
            if has_box:
                b = np.stack([p.sam_box() for p in group])
                boxes = torch.as_tensor(pr.transform.apply_boxes(b, pr.original_size), dtype=torch.float, device=dev)
            if has_mask:
                masks_in = torch.as_tensor(np.stack([p.mask_input for p in group]), dtype=torch.float, device=dev)[
                    :, None
                ]
            masks, scores, low = pr.predict_torch(coords, labels, boxes, masks_in, multimask_output=multi)
            masks, scores, low = masks.cpu().numpy(), scores.float().cpu().numpy(), low.float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = SamMasks(masks[j], scores[j], low[j])
        return out  # type: ignore[return-value]


class HfSam(Segmenter):
    """transformers' `SamModel` + `SamProcessor` (HF-format checkpoints)."""

    name = "transformers"

    def __init__(self, model, processor, source: str = "", cache_size: int = 8):
        super().__init__(cache_size)
        self.model = model.eval()
        self.processor = processor
        self.source = source

    def _embed(self, arr: np.ndarray):
        enc = self.processor(images=arr, return_tensors="pt")
        pixel_values = enc["pixel_values"].to(self.model.device)
        emb = self.model.get_image_embeddings(pixel_values)
        return emb, enc["original_sizes"], enc["reshaped_input_sizes"]

    def _decode(self, state, prompts: list[SamPrompt]) -> list[SamMasks]:
        import torch

        emb, original_sizes, reshaped = state
        oh, ow = (int(v) for v in original_sizes[0])
        scale = self.processor.image_processor  # the resize the processor applied to the image
        out: list[SamMasks | None] = [None] * len(prompts)
        for (n_pts, has_box, has_mask, multi), idx in _groups(prompts).items():
            group = [prompts[i] for i in idx]
            kwargs: dict = {}
            rh, rw = (int(v) for v in reshaped[0])
            sx, sy = rw / ow, rh / oh
            if n_pts:
                pts = np.array([p.points for p in group], dtype=np.float64) * [sx, sy]
                kwargs["input_points"] = torch.as_tensor(pts, dtype=torch.float)[None]  # [1, N, k, 2]
                kwargs["input_labels"] = torch.as_tensor(np.array([p.labels for p in group]), dtype=torch.long)[None]
            if has_box:
                b = np.stack([p.sam_box() for p in group]) * [sx, sy, sx, sy]
                kwargs["input_boxes"] = torch.as_tensor(b, dtype=torch.float)[None]  # [1, N, 4]
            if has_mask:
                if len(group) != 1:  # SamModel takes one mask prompt per image
                    for i in idx:
                        out[i] = self._decode(state, [prompts[i]])[0]
                    continue
                kwargs["input_masks"] = torch.as_tensor(group[0].mask_input, dtype=torch.float)[None, None]
            kwargs = {k: v.to(self.model.device) for k, v in kwargs.items()}
            res = self.model(image_embeddings=emb, multimask_output=multi, **kwargs)
            low = res.pred_masks[0].float()  # [N, K, h, w]
            masks = scale.post_process_masks(low[None].cpu(), original_sizes, reshaped, binarize=True)[0]
            scores = res.iou_scores[0].float().cpu().numpy()
            for j, i in enumerate(idx):
                out[i] = SamMasks(masks[j].numpy().astype(bool), scores[j], low[j].cpu().numpy())
        return out  # type: ignore[return-value]


# ---- the spec registry: every kind of SAM spec, its help, its torch-free check and its loader ----------


@dataclass(frozen=True)
class SamBackend:
    """One kind of SAM spec, named the way segment-anything's `sam_model_registry` names its builders.

    `SAM_BACKENDS` is the one place a spec is understood: `parse_sam_spec` picks the kind, `check_sam_spec`
    runs its `check` and `load_segmenter` its `check`, then its `load`; `SAM_HELP` / `SAM_SPECS` are written
    from it.

    Attributes:
        name: the registry key.
        prefix: "vit_b:", "hf:", ...: the spec is PREFIX + ARGUMENT (a non-empty argument); a prefix without
            a colon ("testbed") is the whole spec (argument ""); "" is the fallback, the spec itself a DIR.
        syntax: how help and error messages write the spec ("vit_b:PATH").
        help: what the spec names, for `SAM_HELP`.
        check: argument -> None; raises `CheckpointError`. Cheap: files only, imports no torch.
        load: (argument, device) -> `Segmenter`, called only after `check` passed; imports torch.
        sa_model: the `segment_anything.sam_model_registry` key of an official `.pth` kind, else None.
    """

    name: str
    prefix: str
    syntax: str
    help: str
    check: Callable[[str], None] = field(repr=False)
    load: Callable[[str, Any], Segmenter] = field(repr=False)
    sa_model: str | None = None

    def claims(self, spec: str) -> str | None:
        """The argument when `spec` (stripped) is of this kind, else None (the fallback claims nothing)."""
        if self.prefix.endswith(":"):
            rest = spec[len(self.prefix) :] if spec.startswith(self.prefix) else ""
            return rest or None
        return "" if self.prefix and spec == self.prefix else None


def _check_nothing(arg: str) -> None:
    return None


def _load_testbed(arg: str, device) -> OfficialSam:
    return _official_dir(TESTBED_SAM, device, "testbed")


def _check_official(kind: str, arg: str) -> None:
    if not Path(arg).is_file():
        raise CheckpointError(f"SAM checkpoint {arg!r} is not a file ({kind} needs an official .pth)")


def _load_official(kind: str, arg: str, device) -> OfficialSam:
    from grounding.sam_import import import_segment_anything

    sa = import_segment_anything()
    model = sa.sam_model_registry[kind](checkpoint=str(Path(arg))).to(device)
    return OfficialSam(model, source=f"{kind}:{arg}")


def _check_hf(arg: str) -> None:
    path = Path(arg)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise CheckpointError(f"{arg} is not a transformers SAM directory (no config.json)")


def _load_hf(arg: str, device) -> HfSam:
    return _hf_dir(Path(arg), device)


def _check_dir(arg: str) -> None:
    path = Path(arg)
    if not (arg and path.is_dir() and ((path / "sam_config.json").is_file() or (path / "config.json").is_file())):
        raise CheckpointError(f"unknown SAM spec {arg!r}; valid: {SAM_SPECS}")


def _load_dir(arg: str, device) -> Segmenter:
    path = Path(arg)
    if (path / "sam_config.json").is_file():
        return _official_dir(path, device, str(path))
    return _hf_dir(path, device)


def _official_kind(kind: str, title: str) -> SamBackend:
    return SamBackend(
        name=kind,
        prefix=f"{kind}:",
        syntax=f"{kind}:PATH",
        help=f"official {title} .pth",
        check=partial(_check_official, kind),
        load=partial(_load_official, kind),
        sa_model=kind,
    )


SAM_BACKENDS: dict[str, SamBackend] = {
    b.name: b
    for b in (
        SamBackend("testbed", "testbed", "testbed", "the embedded tiny SAM", _check_nothing, _load_testbed),
        _official_kind("vit_b", "ViT-B"),
        _official_kind("vit_l", "ViT-L"),
        _official_kind("vit_h", "ViT-H"),
        SamBackend("hf", "hf:", "hf:DIR", "a transformers SamModel directory", _check_hf, _load_hf),
        SamBackend("dir", "", "DIR", "a saved official-architecture SAM", _check_dir, _load_dir),
    )
}
_FALLBACK = "dir"  # the kind of a spec no prefix claims

# the fallback's bare syntax says nothing on its own: it carries its help
SAM_SPECS = " | ".join(b.syntax if b.prefix else f"{b.syntax} ({b.help})" for b in SAM_BACKENDS.values())
_HELP_ITEMS = [f"{b.syntax} ({b.help})" for b in SAM_BACKENDS.values()]
SAM_HELP = ", ".join(_HELP_ITEMS[:-1]) + ", or " + _HELP_ITEMS[-1] + "."


def parse_sam_spec(spec: str) -> tuple[SamBackend, str]:
    """(the kind of SAM `spec` names, its argument): syntax only, no files, no torch. Every spec has a kind:
    one no prefix claims is the bare-DIR fallback, whose check refuses it when it is no SAM directory."""
    spec = (spec or "").strip()
    for backend in SAM_BACKENDS.values():
        arg = backend.claims(spec)
        if arg is not None:
            return backend, arg
    return SAM_BACKENDS[_FALLBACK], spec


def check_sam_spec(spec: str) -> None:
    """Raise `CheckpointError` for a spec that cannot name a SAM (cheap: no torch, files only)."""
    backend, arg = parse_sam_spec(spec)
    backend.check(arg)


def load_segmenter(spec: str = "testbed", device="cpu") -> Segmenter:
    """A `Segmenter` from a spec (`SAM_BACKENDS`; `SAM_HELP` lists them): `testbed` (the embedded tiny SAM),
    `vit_b:PATH` / `vit_l:PATH` / `vit_h:PATH` (official .pth), `hf:DIR` (transformers format), or a
    directory (saved by `save_sam`, or a transformers one).

    Raises `CheckpointError` (one clear line) for an unknown spec or a missing / unreadable checkpoint.
    """
    spec = (spec or "").strip()
    backend, arg = parse_sam_spec(spec)
    backend.check(arg)
    try:
        return backend.load(arg, device)
    except InputError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load SAM {spec!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def _official_dir(path: Path, device, source: str) -> OfficialSam:
    from grounding.sam_model import load_sam_dir

    if not (path / "sam_config.json").is_file():
        raise CheckpointError(f"{path} holds no sam_config.json (a SAM saved by `lucid testbed train-sam`)")
    model, _ = load_sam_dir(path)
    return OfficialSam(model.to(device), source=source)


def _hf_dir(path: Path, device) -> HfSam:
    from transformers import SamModel, SamProcessor

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a transformers SAM directory (no config.json)")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != "sam":
        raise CheckpointError(f"{path} holds a {cfg.get('model_type')!r} model, not SAM")
    return HfSam(SamModel.from_pretrained(path).to(device), SamProcessor.from_pretrained(path), source=f"hf:{path}")
