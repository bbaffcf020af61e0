"""Train the embedded tiny LLaVA on the shapes world: LLaVA's staged recipe in miniature.

Stages (each checkpointed under OUT/.work, so an interrupted run resumes at the last finished stage):

1. **vision**: pre-train the CLIP vision tower alone with dense supervision the shapes world gives
   for free: every patch token of the layer LLaVA reads (`vision_feature_layer`) predicts which
   category covers it (soft coverage, background included) and, with weight `vision_position`, its own
   grid row and column (so the features LLaVA reads keep where they are, as CLIP's keep it on real
   photos), and the pooled CLS predicts the set of categories in the scene (the "caption" of the
   image). The heads are thrown away afterwards.
2. **align**: vision tower frozen; projector and Llama trained from scratch on multi-turn
   instruction data (existence, colour, count, captions, and a `region` share of region-level data:
   "Where is the {c} {s}?" -> a box as text, "What is at [box]?" -> the object, LLaVA-1.5's RefCOCO /
   Visual Genome analogue), loss on answers only. No loss touches attention.
3. **tune**: everything trainable, the vision tower at a lower learning rate.

Run: `lucid testbed train --seed 0 --out DIR`. The result is an ordinary llava-hf directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import LlavaForConditionalGeneration

from testbed.studies.data import Batch, encode_conversation, make_batch
from testbed.studies.model import TinyLlavaShape, build_config, build_processor, build_tokenizer
from testbed.world.language import POPE_SPLITS, QA, category_frequency, color_question, cooccurrence, pope_questions
from testbed.world.scenes import CATEGORIES, SHAPES, TRAIN_CONFIG, WorldConfig, scenes


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    shape: TinyLlavaShape = field(default_factory=TinyLlavaShape)
    world: WorldConfig = TRAIN_CONFIG
    vision_steps: int = 1200
    vision_batch: int = 48
    vision_lr: float = 2e-3
    align_steps: int = 2400
    tune_steps: int = 1200
    batch: int = 32
    lr: float = 1e-3
    tune_vision_lr_scale: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    turns: tuple[int, int] = (1, 4)
    threads: int = 2
    region: float = 0.3  # share of QAs that are region-level (box as text / object at a box)
    vision_position: float = 0.5  # weight of the vision stage's patch row/column targets (0 = off)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


class VisionHeads(torch.nn.Module):
    """Throw-away pre-training heads: dense patch categories and scene-level multi-label."""

    def __init__(self, hidden: int, n_categories: int, grid: int):
        super().__init__()
        self.grid = grid
        self.patch = torch.nn.Linear(hidden, 1 + n_categories)
        self.scene = torch.nn.Linear(hidden, n_categories)
        self.position = torch.nn.Linear(hidden, 2 * grid)  # row logits, column logits


def _vision_loss(
    model: LlavaForConditionalGeneration, heads: VisionHeads, batch: Batch, position_weight: float
) -> torch.Tensor:
    cfg = model.config
    out = model.model.vision_tower(batch.pixel_values, output_hidden_states=True)
    patches = out.hidden_states[cfg.vision_feature_layer][:, 1:]  # [B, G*G, D]
    logp = F.log_softmax(heads.patch(patches), -1)
    dense = -(batch.patch_targets * logp).sum(-1).mean()
    scene = F.binary_cross_entropy_with_logits(heads.scene(out.pooler_output), batch.present)
    loss = dense + scene
    if position_weight > 0:
        g = heads.grid
        idx = torch.arange(g * g)
        logits = heads.position(patches)  # [B, G*G, 2G]
        row = F.cross_entropy(logits[..., :g].flatten(0, 1), (idx // g).repeat(len(patches)))
        col = F.cross_entropy(logits[..., g:].flatten(0, 1), (idx % g).repeat(len(patches)))
        loss = loss + position_weight * (row + col)
    return loss


def _run_stage(name, steps, params_groups, loss_fn, batch_fn, recipe, progress, log):
    opt = torch.optim.AdamW(params_groups, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    bases = [g["lr"] for g in opt.param_groups]
    task = progress.add_task(name, total=steps, info="")
    ema = None
    t0 = time.time()
    for step in range(steps):
        for g, base in zip(opt.param_groups, bases):
            g["lr"] = _lr(step, steps, base, recipe.warmup)
        loss = loss_fn(batch_fn())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params_groups for p in g["params"]], 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        progress.update(task, advance=1, info=f"loss {ema:.4f}")
        if step % 100 == 0 or step == steps - 1:
            log.append({"stage": name, "step": step, "loss": round(ema, 5), "elapsed_s": round(time.time() - t0, 1)})
            if not progress.console.is_terminal:
                progress.console.print(json.dumps(log[-1]))
    return time.time() - t0


@torch.no_grad()
def quick_eval(model, processor, n_scenes: int = 150, seed: int = 10_000) -> dict[str, float]:
    """Fast held-out check from next-token logits (no sampling): existence per POPE split and colour."""
    model.eval()
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids(["ĠYes", "ĠNo"])
    held = list(scenes(seed, n_scenes))
    ref = list(scenes(seed + 1, 500))
    freq, co = category_frequency(ref), cooccurrence(ref)
    rng = np.random.default_rng(seed)
    grid = processor.image_processor.crop_size["height"] // processor.patch_size
    pix = processor.image_processor([s.image for s in held], return_tensors="pt")["pixel_values"]
    out: dict[str, float] = {}
    items: dict[str, list[tuple[int, QA]]] = {split: [] for split in POPE_SPLITS}
    for i, s in enumerate(held):
        for split in POPE_SPLITS:
            items[split] += [(i, qa) for qa in pope_questions(s, split, rng, freq, co)]
        for shape in SHAPES:
            if s.count(shape) == 1:
                color = next(o.color for o in s.objects if o.shape == shape)
                items.setdefault("color", []).append((i, QA(color_question(shape), color.capitalize(), "color")))
    for split, qas in items.items():
        correct = 0
        for start in range(0, len(qas), 64):
            chunk = qas[start : start + 64]
            seqs = [
                encode_conversation(processor, grid * grid, [QA(qa.question, "", qa.kind)])[0][:-2] for _, qa in chunk
            ]
            ids = torch.tensor(seqs)  # same length within a family
            logits = model(input_ids=ids, pixel_values=pix[[i for i, _ in chunk]], logits_to_keep=1).logits[:, -1]
            if split == "color":
                cands = tok.convert_tokens_to_ids(["Ġ" + c.capitalize() for c in ("red", "green", "blue", "yellow")])
                pred = [("Red", "Green", "Blue", "Yellow")[j] for j in logits[:, cands].argmax(-1).tolist()]
            else:
                pred = ["Yes" if a > b else "No" for a, b in zip(logits[:, yes].tolist(), logits[:, no].tolist())]
            correct += sum(p == qa.answer for p, (_, qa) in zip(pred, chunk))
        out[split] = round(correct / len(qas), 4)
    model.train()
    return out


def train(out: str | Path, recipe: Recipe = Recipe()) -> dict:
    """Train the tiny LLaVA and save it to `out` as an llava-hf directory. Returns the training log."""
    out = Path(out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    processor = build_processor(recipe.shape, tokenizer)
    config = build_config(recipe.shape, tokenizer)
    model = LlavaForConditionalGeneration(config)
    model.train()
    heads = VisionHeads(recipe.shape.vision_hidden, len(CATEGORIES), recipe.shape.grid)
    rng = np.random.default_rng(recipe.seed)
    log: list[dict] = []
    timings: dict[str, float] = {}
    evals: dict[str, dict] = {}

    def lm_loss(b: Batch) -> torch.Tensor:
        return model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, labels=b.labels
        ).loss

    vision = model.model.vision_tower
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    stages = [
        (
            "vision",
            recipe.vision_steps,
            lambda: [{"params": list(vision.parameters()) + list(heads.parameters()), "lr": recipe.vision_lr}],
            lambda b: _vision_loss(model, heads, b, recipe.vision_position),
            lambda: make_batch(processor, rng, recipe.world, recipe.vision_batch, with_text=False),
        ),
        (
            "align",
            recipe.align_steps,
            lambda: [{"params": rest, "lr": recipe.lr}],
            lm_loss,
            lambda: make_batch(processor, rng, recipe.world, recipe.batch, recipe.turns, region=recipe.region),
        ),
        (
            "tune",
            recipe.tune_steps,
            lambda: [
                {"params": rest, "lr": recipe.lr * 0.5},
                {"params": list(vision.parameters()), "lr": recipe.lr * recipe.tune_vision_lr_scale},
            ],
            lm_loss,
            lambda: make_batch(processor, rng, recipe.world, recipe.batch, recipe.turns, region=recipe.region),
        ),
    ]
    with _progress() as progress:
        for name, steps, groups, loss_fn, batch_fn in stages:
            ckpt = work / f"{name}.pt"
            if ckpt.exists():
                state = torch.load(ckpt, weights_only=False)
                model.load_state_dict(state["model"])
                rng = state["rng"]
                log, timings, evals = state["log"], state["timings"], state["evals"]
                progress.console.print(f"[green]resumed[/] stage {name} from {ckpt}")
                continue
            for p in model.parameters():
                p.requires_grad_(False)
            for g in groups():
                for p in g["params"]:
                    p.requires_grad_(True)
            timings[name] = round(_run_stage(name, steps, groups(), loss_fn, batch_fn, recipe, progress, log), 1)
            if name != "vision":
                evals[name] = quick_eval(model, processor)
                progress.console.print(f"{name}: {evals[name]}")
            torch.save({"model": model.state_dict(), "rng": rng, "log": log, "timings": timings, "evals": evals}, ckpt)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "recipe": asdict(recipe),
        "timings_s": timings,
        "quick_eval": evals,
        "log": log,
        "torch": torch.__version__,
        "threads": recipe.threads,
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=1, default=str))
    return record


if __name__ == "__main__":  # python -m testbed.studies.train OUT [key=value ...]
    import sys

    kwargs = {}
    for kv in sys.argv[2:]:
        k, v = kv.split("=")
        kwargs[k] = type(getattr(Recipe(), k))(v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(sys.argv[1], replace(Recipe(), **kwargs))
