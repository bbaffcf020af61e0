"""Training batches for the tiny LLaVA, built exactly as the checkpoint's own processor builds inputs.

`encode_conversation` produces the same token ids as `processor.apply_chat_template` followed by
`processor(images=..., text=...)` (tested), plus labels that are -100 everywhere except on the
assistant's answers and their `</s>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor

from testbed.world.language import QA, SUFFIX_SHARE, sample_qas
from testbed.world.scenes import CATEGORIES, Scene, WorldConfig, render_scene, with_size

IGNORE = -100


@dataclass(frozen=True)
class Batch:
    pixel_values: torch.Tensor  # [B, 3, S, S]
    input_ids: torch.Tensor  # [B, T] (right padded: position ids then match generation's)
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    patch_targets: torch.Tensor  # [B, G*G, 1 + n_categories] soft coverage (background first)
    present: torch.Tensor  # [B, n_categories] multi-hot


def encode_conversation(processor: LlavaProcessor, n_image_tokens: int, qas: list[QA]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a (possibly multi-turn) conversation about one image."""
    tok = processor.tokenizer
    ids: list[int] = [tok.bos_token_id]
    labels: list[int] = [IGNORE]
    for i, qa in enumerate(qas):
        prefix = "USER: " + (processor.image_token * n_image_tokens + "\n" if i == 0 else "")
        user = tok(prefix + qa.question + " ASSISTANT:", add_special_tokens=False).input_ids
        answer = tok(" " + qa.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids += user + answer
        labels += [IGNORE] * len(user) + answer
    return ids, labels


def patch_coverage(scene: Scene, size: int, grid: int) -> np.ndarray:
    """[grid*grid, 1 + n_categories]: fraction of each patch covered by each category (col 0: background)."""
    cov = np.zeros((1 + len(CATEGORIES), size, size), dtype=np.float32)
    for o in scene.objects:
        m = Image.fromarray(o.mask.astype(np.uint8) * 255)
        if m.size != (size, size):
            m = m.resize((size, size), Image.BOX)
        cov[1 + CATEGORIES.index(o.category)] += np.asarray(m, dtype=np.float32) / 255.0
    cov[1:] = np.clip(cov[1:], 0, 1)
    cov[0] = np.clip(1.0 - cov[1:].sum(0), 0, 1)
    p = size // grid
    cov = cov.reshape(len(cov), grid, p, grid, p).mean((2, 4))  # [C, G, G]
    cov /= cov.sum(0, keepdims=True)
    return cov.reshape(len(cov), -1).T


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, size: int) -> Scene:
    """A training scene: half at the model's resolution, half at another square size (resized by the
    processor), with random anti-aliasing, so scenes drawn by other code are in distribution."""
    seed = int(rng.integers(2**62))
    if rng.random() < 0.5:
        side = int(rng.integers(48, 257))
        cfg = with_size(cfg, (side, side))
    else:
        cfg = with_size(cfg, (size, size))
    cfg = WorldConfig(**{**cfg.__dict__, "supersample": int(rng.choice([1, 2, 4]))})
    return render_scene(seed, cfg)


def make_batch(
    processor: LlavaProcessor,
    rng: np.random.Generator,
    cfg: WorldConfig,
    batch_size: int,
    turns: tuple[int, int] = (1, 4),
    with_text: bool = True,
    region: float = 0.0,
    language: str = "v3",
    suffix: float = SUFFIX_SHARE,
) -> Batch:
    """A training batch of `batch_size` scenes (see `sample_scene`) with their patch coverage and category
    sets and, `with_text`, a conversation of `turns` QAs each (`sample_qas` in `language`,
    `region` share, `suffix` share)."""
    size = processor.image_processor.crop_size["height"]
    grid = size // processor.patch_size
    scenes = [sample_scene(rng, cfg, size) for _ in range(batch_size)]
    pixel_values = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    patch_targets = torch.from_numpy(np.stack([patch_coverage(s, size, grid) for s in scenes]))
    present = torch.zeros(batch_size, len(CATEGORIES))
    for i, s in enumerate(scenes):
        for c in s.categories():
            present[i, CATEGORIES.index(c)] = 1.0
    if not with_text:
        empty = torch.zeros(batch_size, 0, dtype=torch.long)
        return Batch(pixel_values, empty, empty, empty, patch_targets, present)
    seqs = []
    for s in scenes:
        n = int(rng.integers(turns[0], turns[1] + 1))
        seqs.append(encode_conversation(processor, grid * grid, sample_qas(s, rng, n, region, language, suffix)))
    T = max(len(ids) for ids, _ in seqs)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((batch_size, T), pad, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, T, dtype=torch.long)
    labels = torch.full((batch_size, T), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(lab)
    return Batch(pixel_values, input_ids, attention_mask, labels, patch_targets, present)
