"""Train the embedded tiny LLaVA on the shapes world: LLaVA's staged recipe in miniature.

Stages (each checkpointed under OUT/.work when finished, and every `save_every_s` of wall time within a
stage into OUT/.work/<stage>-partial.pt: model, optimizer, rng and step; an interrupted run resumes where
it was, bit for bit as if it had not been interrupted):

1. **vision**: pre-train the CLIP vision tower alone with dense supervision the shapes world gives
   for free: every patch token of the layer LLaVA reads (`vision_feature_layer`) predicts which
   category covers it (soft coverage, background included) and, with weight `vision_position`, its own
   grid row and column (so the features LLaVA reads keep where they are, as CLIP's keep it on real
   photos), and the pooled CLS predicts the set of categories in the scene (the "caption" of the
   image). The heads are thrown away afterwards.
2. **align**: vision tower frozen; projector and Llama trained from scratch on multi-turn
   instruction data (existence, colour, count, captions, and a `region` share of region-level data:
   "Where is the {c} {s}?" -> a box as text, "What is at [box]?" -> the object, LLaVA-1.5's RefCOCO /
   Visual Genome analogue), loss on answers only. No loss touches attention. Language v3 adds the
   benchmarks' prompt formats (paraphrases, LLaVA-1.5's short-answer suffix, bare-shape existence) and
   detailed descriptions (`testbed.world.language`).
3. **tune**: everything trainable, the vision tower at a lower learning rate.

The loss is on answer tokens only: `loss=token` (the default) averages over the batch's answer tokens, so a
60-token description outweighs a one-word answer 60 to 1; `loss=answer` (`answer_balanced_loss`) gives every
maximal run of answer tokens the same weight (how the v3 checkpoint's short answers were recovered).
`init=DIR` starts from an llava-hf directory's weights instead of from scratch; stages with 0 steps are
skipped (`init=DIR vision_steps=0 align_steps=0 tune_steps=N`: a continuation).

Recipes (`Recipe.named`): **v3** (the default): 128 px / patch 8 = 16x16 = 256 image tokens, language v3,
region data 0.3, position targets 0.5, vision 800 / align 1700 / tune 700 steps (batches 48 / 32 / 32);
measured 1.20 / 2.66 / 2.73 s per step with 2 threads on the 2-core machine when nothing else runs (96 px:
0.62 / 1.25 / 1.42; 192 px / 24x24: 4.24 / 7.06 / 8.63), so about 2 h 7 min with two quick_evals;
**v2**: the v1 shape with region data and position targets
(language v1, tokenizer v2), not adopted; **v1**: the committed checkpoint's (`fcd6734`): 96 px / patch 8
= 144 image tokens, language and tokenizer v1, vision 1200 x 48 at 2e-3, align 2000 x 32 at 1e-3, tune
1200 x 32 at 5e-4 (vision at 1e-4), warm-up 100, weight decay 0.01, 1-4 turns, no region data, no
position targets.

Run: `lucid testbed train --seed 0 --out DIR` or `python -m testbed.studies.train DIR [recipe=v1|v2|v3]
[key=value ...]`. The result is an ordinary llava-hf directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import LlavaForConditionalGeneration

from testbed.studies.data import IGNORE, Batch, encode_conversation, make_batch
from testbed.studies.model import TinyLlavaShape, build_config, build_processor, build_tokenizer
from testbed.world.language import (
    DETAIL_QUESTIONS,
    EVAL_ONLY,
    POPE_SPLITS,
    QA,
    SUFFIX_SHARE,
    category_frequency,
    color_question,
    cooccurrence,
    existence_question,
    mentioned_categories,
    pope_questions,
    with_suffix,
)
from testbed.world.scenes import CATEGORIES, SHAPES, TRAIN_CONFIG, WorldConfig, scenes


@dataclass(frozen=True)
class Recipe:
    """A training recipe. The defaults are v3's; `Recipe.v1()` / `Recipe.v2()` are the earlier ones (see the
    module docstring). `eval_scenes` / `eval_detail` only size the quick held-out check after the align and
    tune stages (0: skip it); they do not change the weights."""

    seed: int = 0
    shape: TinyLlavaShape = field(default_factory=TinyLlavaShape.v3)
    world: WorldConfig = TRAIN_CONFIG
    language: str = "v3"  # testbed.world.language version of the training data and tokenizer
    vision_steps: int = 800
    vision_batch: int = 48
    vision_lr: float = 2e-3
    align_steps: int = 1700
    tune_steps: int = 700
    batch: int = 32
    lr: float = 1e-3
    tune_vision_lr_scale: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    turns: tuple[int, int] = (1, 4)
    threads: int = 2
    region: float = 0.3  # share of QAs that are region-level (box as text / object at a box)
    suffix: float = SUFFIX_SHARE  # share of v3 short-answer questions carrying LLaVA-1.5's answer suffix
    vision_position: float = 0.5  # weight of the vision stage's patch row/column targets (0 = off)
    loss: str = "token"  # "token": mean over answer tokens (LLaVA's); "answer": every answer weighs the same
    init: str = ""  # an llava-hf directory to start from (its weights; stages with 0 steps are skipped)
    eval_scenes: int = 150  # quick_eval's held-out scenes (0: no quick_eval)
    eval_detail: int = 40  # of which this many are also described in detail (greedy generation)

    @classmethod
    def v1(cls, seed: int = 0) -> Recipe:
        """The committed checkpoint's recipe (commit fcd6734): 144 image tokens, the four historical
        questions, tokenizer v1, vision 1200 / align 2000 / tune 1200 steps, no region data, no position
        targets."""
        return cls(
            seed=seed,
            shape=TinyLlavaShape.v1(),
            language="v1",
            vision_steps=1200,
            align_steps=2000,
            tune_steps=1200,
            region=0.0,
            vision_position=0.0,
        )

    @classmethod
    def v2(cls, seed: int = 0) -> Recipe:
        """v1 plus region data (0.3) and position targets (0.5), align 2400 steps, tokenizer v2 (not adopted)."""
        return cls(
            seed=seed,
            shape=TinyLlavaShape.v1(),
            language="v2",
            vision_steps=1200,
            align_steps=2400,
            tune_steps=1200,
            region=0.3,
            vision_position=0.5,
        )

    @classmethod
    def v3(cls, seed: int = 0) -> Recipe:
        return cls(seed=seed)

    @classmethod
    def named(cls, name: str, seed: int = 0) -> Recipe:
        """'v1' | 'v2' | 'v3' -> that recipe with `seed`."""
        makers = {"v1": cls.v1, "v2": cls.v2, "v3": cls.v3}
        if name not in makers:
            raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(makers)}")
        return makers[name](seed)


def answer_balanced_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy where every answer (a maximal run of labelled tokens) weighs the same,
    whatever its length: a one-word "Yes." counts as much as a 60-token description. The token mean
    (LLaVA's loss) gives short answers a fifth of the gradient in language v3's mix."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    tok = F.cross_entropy(logits.flatten(0, 1), labels.clamp_min(0).flatten(), reduction="none").view(labels.shape)
    starts = mask & ~F.pad(mask[:, :-1], (1, 0), value=False)  # first token of each answer
    run_id = torch.cumsum(starts.flatten().long(), 0).view(labels.shape) * mask  # 0 outside answers
    n_runs = int(run_id.max())
    lengths = torch.zeros(n_runs + 1).index_add_(0, run_id.flatten(), mask.flatten().float())
    weight = mask.float() / lengths.clamp_min(1)[run_id]
    return (tok * weight).sum() / max(1, n_runs)


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


class Interrupted(Exception):
    """Raised by an `on_step` hook to stop a run (tests); the last partial checkpoint stays."""


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interruption while saving leaves the previous checkpoint


def _run_stage(
    name: str,
    steps: int,
    params_groups: list[dict],
    loss_fn: Callable[[Batch], torch.Tensor],
    batch_fn: Callable[[np.random.Generator], Batch],
    recipe: Recipe,
    progress: Progress,
    run: dict,
    modules: dict[str, torch.nn.Module],
    partial: Path,
    save_every_s: float,
    on_step: Callable[[str, int], None] | None,
) -> None:
    """Train one stage, resuming from `partial` if it holds this stage, and saving it every `save_every_s`
    of wall time. `run` holds the state that travels with checkpoints: rng, log, timings, evals."""
    opt = torch.optim.AdamW(params_groups, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    bases = [g["lr"] for g in opt.param_groups]
    params = [p for g in params_groups for p in g["params"]]
    start, ema, before = 0, None, 0.0
    if partial.exists():
        state = torch.load(partial, weights_only=False)
        if state["recipe"] != _recipe_key(recipe):
            raise ValueError(f"{partial} was written by another recipe; delete it to restart stage {name!r}")
        for key, module in modules.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        run.update(rng=state["rng"], log=state["log"], timings=state["timings"], evals=state["evals"])
        start, ema, before = state["step"], state["ema"], state["elapsed_s"]
        progress.console.print(f"[green]resumed[/] stage {name} at step {start}/{steps} from {partial}")
    task = progress.add_task(name, total=steps, completed=start, info="")
    t0 = last_save = time.time()
    for step in range(start, steps):
        for g, base in zip(opt.param_groups, bases):
            g["lr"] = _lr(step, steps, base, recipe.warmup)
        loss = loss_fn(batch_fn(run["rng"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        progress.update(task, advance=1, info=f"loss {ema:.4f}")
        elapsed = before + time.time() - t0
        if step % 100 == 0 or step == steps - 1:
            run["log"].append({"stage": name, "step": step, "loss": round(ema, 5), "elapsed_s": round(elapsed, 1)})
            if not progress.console.is_terminal:
                progress.console.print(json.dumps(run["log"][-1]))
        if on_step is not None:
            on_step(name, step)
        if step < steps - 1 and time.time() - last_save >= save_every_s:
            state = {key: module.state_dict() for key, module in modules.items()}
            state.update(
                stage=name,
                step=step + 1,
                optimizer=opt.state_dict(),
                torch_rng=torch.get_rng_state(),
                rng=run["rng"],
                log=run["log"],
                timings=run["timings"],
                evals=run["evals"],
                ema=ema,
                elapsed_s=elapsed,
                recipe=_recipe_key(recipe),
            )
            _save(state, partial)
            last_save = time.time()
    run["timings"][name] = round(before + time.time() - t0, 1)


def _recipe_key(recipe: Recipe) -> dict:
    """What a checkpoint must agree with to be resumed (everything that changes the weights)."""
    key = asdict(recipe)
    for k in ("threads", "eval_scenes", "eval_detail"):
        key.pop(k)
    return json.loads(json.dumps(key, default=str))


def _accuracy(model, tok, pix, items: list[tuple[int, QA]], n_image_tokens: int, processor) -> float:
    """Next-token accuracy of one-word answers (Yes/No or a colour) to `items` (scene index, QA)."""
    colors = ("Red", "Green", "Blue", "Yellow")
    yes, no = tok.convert_tokens_to_ids(["ĠYes", "ĠNo"])
    color_ids = tok.convert_tokens_to_ids(["Ġ" + c for c in colors])
    by_length: dict[int, list[tuple[list[int], int, QA]]] = {}
    for i, qa in items:
        ids = encode_conversation(processor, n_image_tokens, [QA(qa.question, "", qa.kind)])[0][:-2]
        by_length.setdefault(len(ids), []).append((ids, i, qa))
    correct = 0
    for group in by_length.values():
        for start in range(0, len(group), 64):
            chunk = group[start : start + 64]
            ids = torch.tensor([ids for ids, _, _ in chunk])
            logits = model(input_ids=ids, pixel_values=pix[[i for _, i, _ in chunk]], logits_to_keep=1).logits[:, -1]
            if chunk[0][2].kind == "color":
                pred = [colors[j] for j in logits[:, color_ids].argmax(-1).tolist()]
            else:
                pred = ["Yes" if a > b else "No" for a, b in zip(logits[:, yes].tolist(), logits[:, no].tolist())]
            correct += sum(p == qa.answer for p, (_, _, qa) in zip(pred, chunk))
    return round(correct / max(1, len(items)), 4)


@torch.no_grad()
def quick_eval(
    model,
    processor,
    n_scenes: int = 150,
    seed: int = 10_000,
    language: str = "v3",
    n_detail: int = 40,
    n_extra: int = 60,
) -> dict[str, float]:
    """Fast held-out check from next-token logits (no sampling): existence per POPE split and colour.

    Language v3 adds, on the first `n_extra` scenes: `suffix_<split>` (the POPE random / adversarial
    questions with ANSWER_SUFFIX), `bare` (existence of each bare shape), `held_out_exist` (the EVAL_ONLY
    existence paraphrase on the POPE-random questions); and from greedy answers to DETAIL_QUESTIONS[0]
    ("Please describe this image in detail.") on the first `n_detail` scenes: `detail_<split>` (a POPE
    question counts as answered Yes iff the description names the category), `detail_recall`,
    `detail_chair_i` and `detail_tokens` (mean length).
    """
    model.eval()
    tok = processor.tokenizer
    held = list(scenes(seed, n_scenes))
    ref = list(scenes(seed + 1, 500))
    freq, co = category_frequency(ref), cooccurrence(ref)
    rng = np.random.default_rng(seed)
    grid = processor.image_processor.crop_size["height"] // processor.patch_size
    pix = processor.image_processor([s.image for s in held], return_tensors="pt")["pixel_values"]
    items: dict[str, list[tuple[int, QA]]] = {split: [] for split in POPE_SPLITS}
    for i, s in enumerate(held):
        for split in POPE_SPLITS:
            items[split] += [(i, qa) for qa in pope_questions(s, split, rng, freq, co)]
        for shape in SHAPES:
            if s.count(shape) == 1:
                color = next(o.color for o in s.objects if o.shape == shape)
                items.setdefault("color", []).append((i, QA(color_question(shape), color.capitalize(), "color")))
    if language == "v3":
        for split in ("random", "adversarial"):
            items[f"suffix_{split}"] = [
                (i, QA(with_suffix(qa.question), qa.answer, qa.kind)) for i, qa in items[split] if i < n_extra
            ]
        items["bare"] = [
            (i, QA(existence_question(None, shape), "Yes" if s.count(shape) else "No", "exist"))
            for i, s in enumerate(held[:n_extra])
            for shape in SHAPES
        ]
        held_out = EVAL_ONLY["exist"]
        items["held_out_exist"] = [
            (i, QA(existence_question(*_category(qa.question), held_out), qa.answer, qa.kind))
            for i, qa in items["random"]
            if i < n_extra
        ]
    out = {name: _accuracy(model, tok, pix, qas, grid * grid, processor) for name, qas in items.items()}
    if language == "v3" and n_detail > 0:
        out.update(_detail_eval(model, processor, held[:n_detail], pix[:n_detail], items, grid * grid))
    model.train()
    return out


def _category(question: str) -> tuple[str, str]:
    words = question.rstrip("?").split()
    i = words.index("a")
    return words[i + 1], words[i + 2]


def _detail_eval(model, processor, held, pix, items, n_image_tokens: int) -> dict[str, float]:
    tok = processor.tokenizer
    prompt = encode_conversation(processor, n_image_tokens, [QA(DETAIL_QUESTIONS[0], "", "detail")])[0][:-2]
    texts, lengths = [], []
    for start in range(0, len(held), 20):
        n = len(held[start : start + 20])
        ids = torch.tensor([prompt] * n)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pix[start : start + n],
            max_new_tokens=96,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :]
        for row in gen.tolist():
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            lengths.append(len(row))
            texts.append(tok.decode(row, skip_special_tokens=True))
    named = [mentioned_categories(t) for t in texts]
    out = {}
    for split in ("random", "adversarial"):
        pairs = [(named[i], qa) for i, qa in items[split] if i < len(held)]
        hits = [("Yes" if _category(qa.question) in m else "No") == qa.answer for m, qa in pairs]
        out[f"detail_{split}"] = round(float(np.mean(hits)), 4) if hits else 0.0
    truth = [s.categories() for s in held]
    out["detail_recall"] = round(sum(len(m & t) for m, t in zip(named, truth)) / max(1, sum(map(len, truth))), 4)
    out["detail_chair_i"] = round(sum(len(m - t) for m, t in zip(named, truth)) / max(1, sum(map(len, named))), 4)
    out["detail_tokens"] = round(float(np.mean(lengths)), 1)
    return out


def train(
    out: str | Path,
    recipe: Recipe = Recipe(),
    *,
    save_every_s: float = 600.0,
    on_step: Callable[[str, int], None] | None = None,
) -> dict:
    """Train the tiny LLaVA and save it to `out` as an llava-hf directory. Returns the training log.

    Finished stages are saved to OUT/.work/<stage>.pt, unfinished ones every `save_every_s` seconds of wall
    time to OUT/.work/<stage>-partial.pt; a later call with the same recipe resumes from them and ends
    with the same weights as an uninterrupted run. `on_step(stage, step)` is called after every step
    (before the partial save that step may trigger); raising there stops the run (tests)."""
    out = Path(out)
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(language=recipe.language)
    processor = build_processor(recipe.shape, tokenizer)
    config = build_config(recipe.shape, tokenizer)
    model = LlavaForConditionalGeneration(config)
    model.train()
    heads = VisionHeads(recipe.shape.vision_hidden, len(CATEGORIES), recipe.shape.grid)
    run: dict = {"rng": np.random.default_rng(recipe.seed), "log": [], "timings": {}, "evals": {}}

    if recipe.loss not in ("token", "answer"):
        raise ValueError(f"unknown loss {recipe.loss!r}; valid: token, answer")
    if recipe.init:
        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(recipe.init).state_dict())

    def lm_loss(b: Batch) -> torch.Tensor:
        if recipe.loss == "token":
            return model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, labels=b.labels
            ).loss
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values).logits
        return answer_balanced_loss(logits, b.labels)

    def text_batch(rng: np.random.Generator) -> Batch:
        return make_batch(
            processor,
            rng,
            recipe.world,
            recipe.batch,
            recipe.turns,
            region=recipe.region,
            language=recipe.language,
            suffix=recipe.suffix,
        )

    vision = model.model.vision_tower
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    stages = [
        (
            "vision",
            recipe.vision_steps,
            lambda: [{"params": list(vision.parameters()) + list(heads.parameters()), "lr": recipe.vision_lr}],
            lambda b: _vision_loss(model, heads, b, recipe.vision_position),
            lambda rng: make_batch(processor, rng, recipe.world, recipe.vision_batch, with_text=False),
            {"model": model, "heads": heads},
        ),
        (
            "align",
            recipe.align_steps,
            lambda: [{"params": rest, "lr": recipe.lr}],
            lm_loss,
            text_batch,
            {"model": model},
        ),
        (
            "tune",
            recipe.tune_steps,
            lambda: [
                {"params": rest, "lr": recipe.lr * 0.5},
                {"params": list(vision.parameters()), "lr": recipe.lr * recipe.tune_vision_lr_scale},
            ],
            lm_loss,
            text_batch,
            {"model": model},
        ),
    ]
    with _progress() as progress:
        for name, steps, groups, loss_fn, batch_fn, modules in stages:
            if steps == 0:
                continue
            ckpt, partial = work / f"{name}.pt", work / f"{name}-partial.pt"
            if ckpt.exists():
                state = torch.load(ckpt, weights_only=False)
                if state.get("recipe", _recipe_key(recipe)) != _recipe_key(recipe):
                    raise ValueError(f"{ckpt} was written by another recipe; delete it to retrain stage {name!r}")
                model.load_state_dict(state["model"])
                partial.unlink(missing_ok=True)  # left over if a run stopped between the two writes
                run.update(rng=state["rng"], log=state["log"], timings=state["timings"], evals=state["evals"])
                progress.console.print(f"[green]resumed[/] stage {name} from {ckpt}")
                continue
            for p in model.parameters():
                p.requires_grad_(False)
            for g in groups():
                for p in g["params"]:
                    p.requires_grad_(True)
            _run_stage(
                name, steps, groups(), loss_fn, batch_fn, recipe, progress, run, modules, partial, save_every_s, on_step
            )
            if name != "vision" and recipe.eval_scenes > 0:
                run["evals"][name] = quick_eval(
                    model, processor, recipe.eval_scenes, language=recipe.language, n_detail=recipe.eval_detail
                )
                progress.console.print(f"{name}: {run['evals'][name]}")
            state = {"model": model.state_dict(), **{k: run[k] for k in ("rng", "log", "timings", "evals")}}
            state["recipe"] = _recipe_key(recipe)
            _save(state, ckpt)
            partial.unlink(missing_ok=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "recipe": asdict(recipe),
        "timings_s": run["timings"],
        "quick_eval": run["evals"],
        "log": run["log"],
        "torch": torch.__version__,
        "threads": recipe.threads,
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def _main(argv: list[str]) -> None:
    """python -m testbed.studies.train OUT [recipe=v1|v2|v3] [save_every_s=600] [key=value ...]"""
    if not argv:
        raise SystemExit(_main.__doc__)
    recipe, kwargs, save_every_s = Recipe(), {}, 600.0
    for kv in argv[1:]:
        k, v = kv.split("=", 1)
        if k == "recipe":
            recipe = Recipe.named(v, recipe.seed)
        elif k == "save_every_s":
            save_every_s = float(v)
        else:
            kwargs[k] = type(getattr(Recipe(), k))(v)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train(argv[0], replace(recipe, **kwargs), save_every_s=save_every_s)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
