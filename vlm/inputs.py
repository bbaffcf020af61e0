"""Build model inputs with the checkpoint's own processor and chat template, and the ImageLayout
of every row (image-token positions from `input_ids == image_token_id`, geometry from the
processor's configuration)."""

from __future__ import annotations

import torch

from lucid.errors import ImageError
from vlm.contract import check_question
from vlm.images import ImageLike, load_image
from vlm.layout import (
    ImageGeometry,
    ImageLayout,
    TiledView,
    anyres_token_count,
    anyres_view,
    clip_geometry,
    pad_geometry,
)
from vlm.loader import VLM
from vlm.types import RowSource, VLMInputs

__all__ = ["ImageError", "ImageLike", "build_inputs", "chat_prompt", "image_geometry", "load_image"]


def _size_args(ip) -> tuple[int | None, tuple[int, int] | None, tuple[int, int] | None]:
    size = dict(ip.size)
    shortest = size.get("shortest_edge")
    size_hw = (size["height"], size["width"]) if "height" in size else None
    crop = (
        (ip.crop_size["height"], ip.crop_size["width"])
        if getattr(ip, "do_center_crop", False) and ip.crop_size
        else None
    )
    return shortest, size_hw, crop


def image_geometry(vlm: VLM, original_size: tuple[int, int]) -> ImageGeometry:
    """Geometry of the processor's transform for an image of `original_size` (width, height).

    LLaVA: resize + center crop (CLIP) or pad-to-square + resize (`do_pad`). LLaVA-NeXT: the base view,
    which is the whole image stretched to the square input size (the high-resolution view: `tiles_view`).
    """
    ip = vlm.processor.image_processor
    shortest, size_hw, crop = _size_args(ip)
    if vlm.kind == "llava_next":
        side = shortest if shortest is not None else size_hw[0]
        w, h = original_size
        base = ImageGeometry((w, h), (side, side), (side / w, side / h), (0.0, 0.0))
        return base
    if getattr(ip, "do_pad", False):
        return pad_geometry(original_size, shortest, size_hw, crop)
    return clip_geometry(original_size, shortest, size_hw, crop)


def tiles_view(vlm: VLM, original_size: tuple[int, int], positions: list[int], tile_size: int) -> TiledView:
    """LLaVA-NeXT's high-resolution view of one row.

    Args:
        original_size: (width, height) of the image given to the processor.
        positions: ALL the row's image-token positions, in order: [base cells, then per tile-grid row its
            cells and one newline].
        tile_size: side S of pixel_values [B, P, 3, S, S] (the base input = one tile).

    Raises:
        ValueError: the processor emitted another number of image tokens than the model packs.
    """
    pinpoints = vlm.processor.image_processor.image_grid_pinpoints
    patch = vlm.model.config.vision_config.patch_size
    n_base = (tile_size // patch) ** 2
    n_tiles = anyres_token_count(original_size, pinpoints, tile_size, patch)
    if len(positions) != n_base + n_tiles:
        raise ValueError(
            f"the processor emitted {len(positions)} image tokens for a {original_size[0]}x{original_size[1]} image, "
            f"but LLaVA-NeXT packs {n_base} base + {n_tiles} high-resolution = {n_base + n_tiles}; check the "
            "processor's vision_feature_select_strategy, num_additional_image_tokens and image_grid_pinpoints"
        )
    return anyres_view(original_size, pinpoints, tile_size, patch, positions[n_base:])


Turn = tuple[str, str]  # (role "user" | "assistant", text)


def chat_prompt(
    vlm: VLM, question: str, system: str | None = None, history: tuple[Turn, ...] = (), n_images: int = 1
) -> str:
    """The checkpoint's chat template applied to a conversation with `n_images` images (one by default):
    `history` (earlier user / assistant turns, starting with a user turn, which carries the images) and
    then `question`, the user turn to answer (which carries the images when there is no history)."""
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    turns = [*history, ("user", question)]
    for i, (role, text) in enumerate(turns):
        content = [{"type": "text", "text": text}]
        images = [{"type": "image"}] * n_images if i == 0 else []
        messages.append({"role": role, "content": [*images, *content]})
    return vlm.processor.apply_chat_template(messages, add_generation_prompt=True)


def build_inputs(
    vlm: VLM,
    images: list[ImageLike | tuple[ImageLike, ...]] | ImageLike,
    questions: list[str] | str,
    system: str | None = None,
    history: tuple[Turn, ...] = (),
) -> VLMInputs:
    """Tokenize a batch of (image, question) pairs, left padded, on the model's device. `history`: earlier
    turns of the conversation (shared by the batch; see `chat_prompt`).

    A row's image may be a tuple of images (LLaVA-1.5 only): the prompt then carries them in order, and
    the row's `ImageLayout` describes the first (the others' tokens follow it; CARVE's `final=both`).

    Raises:
        ImageError: an image cannot be read (see `vlm.images`).
        QuestionError: an empty question, or one containing the image token or another special token.
        ValueError: mismatched batch lengths.
    """
    if not isinstance(images, list):
        images = [images]
    if isinstance(questions, str):
        questions = [questions]
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    reserved = vlm.reserved_tokens
    if history and (history[0][0] != "user" or any(r not in ("user", "assistant") for r, _ in history)):
        raise ValueError("history: user / assistant turns, starting with a user turn")
    for q in [*questions, *(t for _, t in history)]:
        check_question(q, reserved)
    groups = [tuple(im) if isinstance(im, (tuple, list)) else (im,) for im in images]
    if any(len(g) != 1 for g in groups) and vlm.kind != "llava":
        raise ValueError(f"several images in one row are supported on LLaVA-1.5 checkpoints, not {vlm.kind}")
    if any(len(g) == 0 for g in groups):
        raise ValueError("a row needs at least one image")
    rows_pil = [tuple(load_image(im) for im in g) for g in groups]
    pil = [g[0] for g in rows_pil]
    texts = [chat_prompt(vlm, q, system, history, len(g)) for q, g in zip(questions, rows_pil, strict=True)]
    flat = [im for g in rows_pil for im in g]
    enc = vlm.processor(images=flat, text=texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    pix = enc["pixel_values"]
    patch = vlm.model.config.vision_config.patch_size
    side = pix.shape[-1]
    grid = (pix.shape[-2] // patch, side // patch)
    layouts = []
    for b, im in enumerate(pil):
        positions = torch.nonzero(ids[b] == vlm.image_token_id).flatten().tolist()
        tiles = None
        if vlm.kind == "llava_next":
            h, w = enc["image_sizes"][b].tolist()  # what the model unpads with
            tiles = tiles_view(vlm, (w, h), positions, side)
            positions = positions[: grid[0] * grid[1]]  # the base view's tokens come first
        elif len(rows_pil[b]) > 1:
            positions = positions[: grid[0] * grid[1]]  # the first image's tokens come first
        layouts.append(ImageLayout(tuple(positions), grid, patch, image_geometry(vlm, im.size), tiles))
    dev = vlm.device
    return VLMInputs(
        input_ids=ids.to(dev),
        attention_mask=enc["attention_mask"].to(dev),
        pixel_values=pix.to(dev, vlm.dtype),
        layouts=tuple(layouts),
        image_sizes=enc["image_sizes"].to(dev) if "image_sizes" in enc else None,
        sources=tuple(RowSource(g, q, system, tuple(history)) for g, q in zip(rows_pil, questions, strict=True)),
    )
