"""Training the embedded tiny SAM on shapes-world scenes (`lucid testbed train-sam`).

The model is the official architecture at small sizes (`grounding.sam_model.SamArchitecture`), trained
from scratch. The recipe follows `../shared/research/tiny-sam-notes.md` (loss: BCE + dice on mask 0
plus the best of masks 1-3, MSE of the IoU head against the actual IoU of all four; AdamW, warm-up,
cosine decay, clip 1.0) and adds what the notes found untrained: several positive and negative points,
point + box, and a second round that feeds the first round's best low-res logits back as `mask_input`
(SAM's own iterative recipe), so refinement with a fed-back mask helps instead of hurting.

Scenes come from the testbed's training distribution (clutter, rotations, colour jitter, occluded
partners: their hidden masks are never prompted) and the evaluation one, at independent widths and
heights of 48-320 px. Images and masks go through the predictor's own `ResizeLongestSide`, pad with
the pixel mean (`Sam.preprocess`), and prompts through the same coordinate transforms, so training sees
exactly what `SamPredictor` will give the model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from grounding.sam_import import import_segment_anything
from grounding.sam_model import SamArchitecture, build_sam, decode_batched, save_sam
from testbed.world.scenes import TRAIN_CONFIG, Scene, SceneObject, WorldConfig, render_scene

PROMPT_KINDS = ("point", "points", "box", "point_box")


@dataclass(frozen=True)
class SamRecipe:
    """Everything that determines a tiny-SAM training run (saved as `recipe.json`)."""

    seed: int = 0
    steps: int = 2400
    batch_images: int = 16
    prompts_per_image: int = 4
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 80
    final_lr_fraction: float = 0.02
    clip: float = 1.0
    #: share of prompts of each kind (single positive point, 2-4 mixed points, box, point + box).
    mix: tuple[float, float, float, float] = (0.4, 0.15, 0.3, 0.15)
    box_jitter_prob: float = 0.7
    box_jitter: float = 0.05  # std of each corner's offset, as a fraction of the box side
    refine_prob: float = 0.5  # steps with a second round fed the first round's mask
    eval_share: float = 0.4  # scenes drawn from the evaluation distribution (rest: training distribution)
    sizes: tuple[int, int] = (48, 320)
    threads: int = 1
    check_every: int = 400
    save_every: int = 100
    architecture: SamArchitecture = field(default_factory=SamArchitecture)


def train_world(rng: np.random.Generator, recipe: SamRecipe) -> WorldConfig:
    lo, hi = recipe.sizes
    w = int(rng.integers(lo, hi + 1))
    h = w if rng.random() < 0.4 else int(rng.integers(lo, hi + 1))
    if rng.random() < recipe.eval_share:
        cfg = WorldConfig(rotation=20.0, color_jitter=20, clutter=0.2, object_scale=(0.12, 0.4))
    else:
        cfg = TRAIN_CONFIG
    ss = int(rng.choice([1, 2, 4])) if max(w, h) <= 160 else int(rng.choice([1, 2]))
    return replace(cfg, size=(w, h), supersample=ss)


def sample_scene(rng: np.random.Generator, recipe: SamRecipe) -> Scene:
    while True:
        scene = render_scene(int(rng.integers(2**62)), train_world(rng, recipe))
        if scene.objects:
            return scene


@dataclass
class Prompt:
    image: int
    kind: str
    points: np.ndarray | None  # [k, 2] original pixels (x, y)
    labels: np.ndarray | None  # [k]
    box: np.ndarray | None  # [4] XYXY inclusive, original pixels
    target: int  # index into the batch's target masks


def _pixel(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(xs)))
    return np.array([xs[i], ys[i]], dtype=np.float64)


def _box(rng: np.random.Generator, obj: SceneObject, size: tuple[int, int], recipe: SamRecipe) -> np.ndarray:
    x0, y0, x1, y1 = obj.bbox
    box = np.array([x0, y0, x1 - 1, y1 - 1], dtype=np.float64)
    if rng.random() < recipe.box_jitter_prob:
        side = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float64)
        box = box + rng.normal(0, recipe.box_jitter, 4) * side
    w, h = size
    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    return np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])])


def make_prompts(rng: np.random.Generator, scenes: list[Scene], recipe: SamRecipe) -> tuple[list[Prompt], list]:
    """Prompts of every kind on each scene's visible objects, and the target object per prompt."""
    prompts, targets = [], []
    n_points = int(rng.integers(2, 5))  # one "points" prompt size per step (a batch needs equal lengths)
    for i, scene in enumerate(scenes):
        objs = scene.objects
        for _ in range(recipe.prompts_per_image):
            obj = objs[int(rng.integers(len(objs)))]
            kind = PROMPT_KINDS[int(rng.choice(len(PROMPT_KINDS), p=np.asarray(recipe.mix) / sum(recipe.mix)))]
            pts = labels = box = None
            if kind in ("point", "point_box"):
                pts, labels = _pixel(rng, obj.mask)[None], np.ones(1)
            if kind == "points":
                n_pos = int(rng.integers(1, n_points + 1))
                others = np.zeros_like(obj.mask)
                for o in objs:
                    if o is not obj:
                        others |= o.mask
                background = ~obj.mask
                neg_pool = others if others.any() and rng.random() < 0.6 else background
                pts = np.stack(
                    [_pixel(rng, obj.mask) for _ in range(n_pos)]
                    + [_pixel(rng, neg_pool) for _ in range(n_points - n_pos)]
                )
                labels = np.array([1.0] * n_pos + [0.0] * (n_points - n_pos))
            if kind in ("box", "point_box"):
                box = _box(rng, obj, scene.image.size, recipe)
            prompts.append(Prompt(i, kind, pts, labels, box, len(targets)))
            targets.append(obj.mask)
    return prompts, targets


class Frame:
    """The predictor's geometry for one image: resize longest side to `img_size`, pad bottom/right."""

    def __init__(self, transform, img_size: int, size_wh: tuple[int, int]):
        self.transform = transform
        self.img_size = img_size
        self.hw = (size_wh[1], size_wh[0])

    def image(self, image: Image.Image) -> torch.Tensor:
        arr = self.transform.apply_image(np.asarray(image.convert("RGB")))
        return torch.as_tensor(arr).permute(2, 0, 1).float()

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        h, w = self.transform.get_preprocess_shape(*self.hw, self.img_size)
        m = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
        out = torch.zeros(self.img_size, self.img_size)
        out[:h, :w] = torch.as_tensor(np.asarray(m) >= 128).float()
        return out

    def coords(self, pts: np.ndarray) -> np.ndarray:
        return self.transform.apply_coords(pts, self.hw)

    def boxes(self, box: np.ndarray) -> np.ndarray:
        return self.transform.apply_boxes(box[None], self.hw)[0]


def mask_losses(logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per prompt (mask 0 + best of 1..K, + IoU-head MSE on all) and the actual IoU [N, 1+K]."""
    up = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    g = gt[:, None].expand_as(up)
    bce = F.binary_cross_entropy_with_logits(up, g, reduction="none").mean((2, 3))
    p = up.sigmoid()
    dice = 1 - (2 * (p * g).sum((2, 3)) + 1) / (p.sum((2, 3)) + g.sum((2, 3)) + 1)
    per = bce + dice
    with torch.no_grad():
        hard = up > 0
        inter = (hard & (g > 0.5)).sum((2, 3)).float()
        union = (hard | (g > 0.5)).sum((2, 3)).float()
        iou = inter / union.clamp(min=1)
    loss = per[:, 0] + per[:, 1:].min(1).values + F.mse_loss(iou_pred, iou, reduction="none").sum(1)
    return loss, iou


def _encode_group(sam, group: list[Prompt], frames: list[Frame], masks_in: torch.Tensor | None):
    coords = labels = boxes = None
    if group[0].points is not None:
        coords = torch.as_tensor(np.stack([frames[p.image].coords(p.points) for p in group]), dtype=torch.float)
        labels = torch.as_tensor(np.stack([p.labels for p in group]), dtype=torch.int)
    if group[0].box is not None:
        boxes = torch.as_tensor(np.stack([frames[p.image].boxes(p.box) for p in group]), dtype=torch.float)
    return sam.prompt_encoder(points=(coords, labels) if coords is not None else None, boxes=boxes, masks=masks_in)


def forward_prompts(sam, emb: torch.Tensor, prompts: list[Prompt], frames: list[Frame], masks_in: torch.Tensor | None):
    """Logits [N, 4, h, w] and IoU predictions [N, 4] for every prompt, in prompt order."""
    pe = sam.prompt_encoder.get_dense_pe()
    n = len(prompts)
    logits = [None] * n
    ious = [None] * n
    for kind in PROMPT_KINDS:
        idx = [i for i, p in enumerate(prompts) if p.kind == kind]
        if not idx:
            continue
        group = [prompts[i] for i in idx]
        m_in = masks_in[idx] if masks_in is not None else None
        sparse, dense = _encode_group(sam, group, frames, m_in)
        img = emb[torch.as_tensor([p.image for p in group])]
        lg, iou = decode_batched(sam.mask_decoder, img, pe, sparse, dense)
        for j, i in enumerate(idx):
            logits[i], ious[i] = lg[j], iou[j]
    return torch.stack(logits), torch.stack(ious)


def lr_at(step: int, recipe: SamRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    lo = recipe.final_lr_fraction
    return recipe.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def check_miou(sam, scenes: list[Scene]) -> dict[str, float]:
    """Point (top-scored of 3) and box mIoU through the stock `SamPredictor` on fixed scenes."""
    sa = import_segment_anything()
    predictor = sa.SamPredictor(sam)
    rng = np.random.default_rng(7)
    pt, bx = [], []
    with torch.no_grad():
        for scene in scenes:
            predictor.set_image(np.asarray(scene.image.convert("RGB")))
            for obj in scene.objects:
                p = _pixel(rng, obj.mask)
                masks, scores, _ = predictor.predict(
                    point_coords=p[None], point_labels=np.array([1]), multimask_output=True
                )
                pt.append(_iou(masks[int(np.argmax(scores))], obj.mask))
                x0, y0, x1, y1 = obj.bbox
                masks, _, _ = predictor.predict(box=np.array([x0, y0, x1 - 1, y1 - 1]), multimask_output=False)
                bx.append(_iou(masks[0], obj.mask))
    return {"point_miou": float(np.mean(pt)), "box_miou": float(np.mean(bx)), "objects": len(pt)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def train_sam(recipe: SamRecipe, out: str | Path, progress: bool = True) -> dict:
    """Train (resuming from `out/train_state.pt` if present); write weights, recipe and log into `out`."""
    from tqdm import tqdm

    sa = import_segment_anything()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    arch = recipe.architecture
    sam = build_sam(arch)
    opt = torch.optim.AdamW(sam.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng(recipe.seed)
    state_file, log_file = out / "train_state.pt", out / "train_log.jsonl"
    step, elapsed = 0, 0.0
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        sam.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        step, elapsed = st["step"], st["elapsed"]
    transform = sa.utils.transforms.ResizeLongestSide(arch.img_size)
    check_scenes = [render_scene(10_000 + i, replace(WorldConfig(), size=(96 + 8 * (i % 12), 96))) for i in range(40)]
    bar = tqdm(total=recipe.steps, initial=step, desc="train-sam", disable=not progress, mininterval=5)
    sam.train()
    while step < recipe.steps:
        t0 = time.perf_counter()
        scenes = [sample_scene(rng, recipe) for _ in range(recipe.batch_images)]
        frames = [Frame(transform, arch.img_size, s.image.size) for s in scenes]
        images = torch.stack([sam.preprocess(f.image(s.image)[None])[0] for f, s in zip(frames, scenes)])
        prompts, targets = make_prompts(rng, scenes, recipe)
        gt = torch.stack([frames[p.image].mask(targets[p.target]) for p in prompts])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        emb = sam.image_encoder(images)
        logits, iou_pred = forward_prompts(sam, emb, prompts, frames, None)
        loss, iou = mask_losses(logits, iou_pred, gt)
        loss = loss.mean()
        refine = rng.random() < recipe.refine_prob
        if refine:
            best = iou_pred.detach().argmax(1)
            fed = logits.detach()[torch.arange(len(prompts)), best][:, None]
            logits2, iou_pred2 = forward_prompts(sam, emb, prompts, frames, fed)
            loss2, iou2 = mask_losses(logits2, iou_pred2, gt)
            loss = 0.5 * (loss + loss2.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), recipe.clip)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        bar.update(1)
        row = {
            "step": step,
            "loss": round(loss.item(), 4),
            "iou0": round(float(iou[:, 0].mean()), 4),
            "lr": lr_at(step - 1, recipe),
            "s": round(elapsed, 1),
        }
        if step % recipe.check_every == 0 or (step == recipe.steps and recipe.check_every <= recipe.steps):
            sam.eval()
            row.update(check_miou(sam, check_scenes))
            sam.train()
            bar.write(json.dumps(row))
        if step % 20 == 0 or "point_miou" in row:
            with log_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if step % recipe.save_every == 0 or step == recipe.steps:
            torch.save(
                {
                    "model": sam.state_dict(),
                    "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "elapsed": elapsed,
                },
                state_file,
            )
    bar.close()
    sam.eval()
    summary = {
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "threads": recipe.threads,
        "parameters": sum(p.numel() for p in sam.parameters()),
    }
    save_sam(sam, arch, out, extra={"trained_by": "lucid testbed train-sam", "summary": summary})
    recipe_json = asdict(recipe)
    (out / "recipe.json").write_text(json.dumps({"recipe": recipe_json, "summary": summary}, indent=2) + "\n")
    return summary


# python -m testbed.studies.sam_train OUT [STEPS]: the same run `lucid testbed train-sam` makes
if __name__ == "__main__":
    import sys

    print(
        json.dumps(
            train_sam(
                replace(SamRecipe(), steps=int(sys.argv[2]) if len(sys.argv) > 2 else SamRecipe.steps), sys.argv[1]
            )
        )
    )
