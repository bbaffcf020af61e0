"""Where the model looks, per attention signal, against the testbed's exact ground truth.

Re-measures the table of `shared/research/gaze-notes.md` on any checkpoint: for each present object
whose category is unique in its scene, several attention signals over the image-token grid, scored by

* pointing: the highest-attention cell's centre lies on the object's visible mask
  (`grounding.scoring.pointing_hit`, the rule of `testbed.studies.localization` and `lucid eval --suite
  testbed-locate`); `chance` is the mean share of cells whose centre lies on the mask, pointing's chance.
  Before, a cell was on the object when the object's visible mask covered >= half of the cell's
  ORIGINAL-image pixel box: the gaze numbers of `docs/testbed.md` (chance 0.057) were measured with
  that rule and are not comparable with a re-measurement;
* lift: attention mass on the object's cells / their share of the cells (1.0 = no preference), where a
  cell is the object's when the mask covers >= half of its ORIGINAL-image pixel box
  (`cells_on_object`, `ImageLayout.cell_box`); objects covering no cell that way are skipped.

Signals (each per layer and head, the head mean as head "mean"):
* `exist_last`: the last prompt row of "Is there a {c} {s} in the image?" (the row that answers);
* `exist_words`: the mean of the rows of the question's colour and shape words;
* `where_last`: the last prompt row of "Where is the {c} {s}?" (the model was trained to answer a box);
* `caption_word`: in a greedy caption, the row that emits the object's shape word;
* `relative`: `exist_last` divided by the last prompt row of "Describe the image." (ViCrop / CARVE's
  contrast), head mean only;
* `cosine`: cosine similarity of the final hidden state of the last prompt row of the existence
  question with the image tokens' final hidden states (READ's signal), no heads.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from grounding.scoring import cells_on_mask, pointing_hit
from mitigation import AttentionRecorder
from testbed.world.language import CAPTION_QUESTION, existence_question, where_question
from testbed.world.scenes import Scene, WorldConfig, referable_objects, scenes
from vlm import VLM, SamplingParams, build_inputs, generate
from vlm.layout import ImageLayout


def cells_on_object(layout: ImageLayout, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """[rows, cols] bool: grid cells whose original-pixel box is covered >= threshold by `mask` [H, W]."""
    rows, cols = layout.grid
    out = np.zeros((rows, cols), dtype=bool)
    h, w = mask.shape
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            xa, xb = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)))
            ya, yb = max(0, int(np.floor(y0))), min(h, int(np.ceil(y1)))
            if xb > xa and yb > ya:
                out[r, c] = mask[ya:yb, xa:xb].mean() >= threshold
    return out


@dataclass
class _Score:
    hits: float = 0.0
    lift: float = 0.0
    n: int = 0

    def add(
        self, attn: np.ndarray, on: np.ndarray, layout: ImageLayout, mask: np.ndarray, hit_cells: np.ndarray
    ) -> None:
        """`attn` [rows, cols]; `on` [rows, cols] bool: the object's cells (lift); `mask` its pixels and
        `hit_cells` = `cells_on_mask(layout, mask)`, computed once per object (pointing)."""
        flat = attn.reshape(-1)
        self.hits += float(pointing_hit(attn, layout, mask, cells=hit_cells))
        share = on.mean()
        self.lift += float(flat[on.reshape(-1)].sum() / max(flat.sum(), 1e-12) / share)
        self.n += 1


def _word_positions(vlm: VLM, input_ids: torch.Tensor, words: list[str]) -> list[int]:
    tok = vlm.processor.tokenizer
    ids = input_ids.tolist()
    out = []
    for w in words:
        tid = tok.convert_tokens_to_ids("Ġ" + w)
        pos = [i for i, t in enumerate(ids) if t == tid]
        if pos:
            out.append(pos[-1])
    return out


def measure(vlm: VLM, n_scenes: int = 60, seed: int = 777, show_progress: bool = True) -> dict:
    """Pointing and lift per signal, layer and head (see module docstring)."""
    L = vlm.n_layers
    scores: dict[tuple[str, int, str], _Score] = defaultdict(_Score)
    held: list[Scene] = list(scenes(seed, n_scenes, WorldConfig()))
    n_obj = 0
    chance = []
    with Progress(disable=not show_progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("gaze", total=len(held))
        for s in held:
            objs = referable_objects(s)
            if not objs:
                bar.advance(task)
                continue
            qs = [existence_question(o.color, o.shape) for o in objs] + [where_question(o.color, o.shape) for o in objs]
            inputs = build_inputs(vlm, [s.image] * len(qs), qs)
            rec = AttentionRecorder(layers=None, prefill_rows="all", hidden_layers=[L], hidden_rows="all")
            generate(vlm, inputs, SamplingParams(max_new_tokens=1), recorder=rec)
            cap_in = build_inputs(vlm, [s.image], [CAPTION_QUESTION])
            cap_rec = AttentionRecorder(layers=None, prefill_rows="last")
            cap = generate(vlm, cap_in, SamplingParams(max_new_tokens=48), recorder=cap_rec)[0]
            cap_words = [vlm.processor.tokenizer.decode([t]).strip().lower() for t in cap.token_ids]
            layout = inputs.layouts[0]
            grid = layout.grid
            n_img = layout.n_tokens
            pos = list(layout.token_positions)
            for i, o in enumerate(objs):
                obj_layout = inputs.layouts[i]
                on = cells_on_object(obj_layout, o.mask)
                if not on.any():
                    continue
                n_obj += 1
                hit_cells = cells_on_mask(obj_layout, o.mask)
                chance.append(hit_cells.mean())
                words = _word_positions(vlm, inputs.input_ids[i], [o.color, o.shape])
                emit = [
                    k
                    for k in range(1, len(cap_words))
                    if cap_words[k].startswith(o.shape) and cap_words[k - 1] == o.color
                ]
                score_args = (on, obj_layout, o.mask, hit_cells)
                hid = rec.hidden_states(L)[i]  # [S, D]
                img_h = torch.nn.functional.normalize(hid[pos].float(), dim=-1)
                last_h = torch.nn.functional.normalize(hid[inputs.input_ids.shape[1] - 1].float(), dim=-1)
                scores[("cosine", L, "-")].add((img_h @ last_h).clamp_min(0).numpy().reshape(grid), *score_args)
                for layer in range(L):
                    a = rec.image_attention(layer)[:, :, : inputs.input_ids.shape[1]].float()  # [B, H, T, N]
                    c = cap_rec.image_attention(layer)[0].float()  # [H, 1 + steps, N]
                    signals = {
                        "exist_last": a[i, :, -1, :n_img],
                        "where_last": a[len(objs) + i, :, -1, :n_img],
                    }
                    if words:
                        signals["exist_words"] = a[i, :, words, :n_img].mean(1)
                    if emit:
                        signals["caption_word"] = c[:, emit[0], :n_img]
                    for name, m in signals.items():
                        for h in range(m.shape[0]):
                            scores[(name, layer, str(h))].add(m[h].numpy().reshape(grid), *score_args)
                        scores[(name, layer, "mean")].add(m.mean(0).numpy().reshape(grid), *score_args)
                    rel = a[i, :, -1, :n_img].mean(0) / c[:, 0, :n_img].mean(0).clamp_min(1e-9)
                    scores[("relative", layer, "mean")].add(rel.numpy().reshape(grid), *score_args)
            bar.advance(task)
    table: dict = {"n_objects": n_obj, "chance": float(np.mean(chance)) if chance else 0.0, "signals": {}}
    for (name, layer, head), sc in sorted(scores.items()):
        table["signals"].setdefault(name, []).append(
            {"layer": layer, "head": head, "pointing": sc.hits / sc.n, "lift": sc.lift / sc.n, "n": sc.n}
        )
    return table


def summary(table: dict) -> list[dict]:
    """Per signal: the best layer of the head mean and the best single head (by pointing)."""
    out = []
    for name, rows in table["signals"].items():
        mean_rows = [r for r in rows if r["head"] in ("mean", "-")]
        head_rows = [r for r in rows if r["head"] not in ("mean", "-")]
        best_mean = max(mean_rows, key=lambda r: r["pointing"]) if mean_rows else None
        best_head = max(head_rows, key=lambda r: r["pointing"]) if head_rows else None
        out.append({"signal": name, "best_head_mean": best_mean, "best_single_head": best_head})
    return out


__all__ = ["cells_on_object", "measure", "summary"]
