"""Build model inputs with the checkpoint's own processor and chat template, and the ImageLayout
of every row (image-token positions from `input_ids == image_token_id`, geometry from the
processor's configuration)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm.layout import ImageGeometry, ImageLayout, clip_geometry, pad_geometry
from vlm.loader import VLM
from vlm.types import VLMInputs

ImageLike = Image.Image | str | os.PathLike | np.ndarray


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


def load_image(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, or an [H, W, 3] uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ImageError(f"array images must be [H, W, 3|4] uint8, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"not an image file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot decode {path} as an image ({e.__class__.__name__}: {e})") from e


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
    which is the whole image stretched to the square input size.
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


def chat_prompt(vlm: VLM, question: str, system: str | None = None) -> str:
    """The checkpoint's chat template applied to one user turn with one image."""
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    return vlm.processor.apply_chat_template(messages, add_generation_prompt=True)


def build_inputs(
    vlm: VLM, images: list[ImageLike] | ImageLike, questions: list[str] | str, system: str | None = None
) -> VLMInputs:
    """Tokenize a batch of (image, question) pairs, left padded, on the model's device.

    Raises:
        ImageError: an image cannot be read.
        ValueError: mismatched batch lengths or an empty question.
    """
    if not isinstance(images, list):
        images = [images]
    if isinstance(questions, str):
        questions = [questions]
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if any(not q.strip() for q in questions):
        raise ValueError("questions must be non-empty")
    pil = [load_image(im) for im in images]
    texts = [chat_prompt(vlm, q, system) for q in questions]
    enc = vlm.processor(images=pil, text=texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    pix = enc["pixel_values"]
    patch = vlm.model.config.vision_config.patch_size
    side = pix.shape[-1]
    grid = (pix.shape[-2] // patch, side // patch)
    layouts = []
    for b, im in enumerate(pil):
        positions = torch.nonzero(ids[b] == vlm.image_token_id).flatten().tolist()
        if vlm.kind == "llava_next":
            positions = positions[: grid[0] * grid[1]]  # the base view's tokens come first
        layouts.append(ImageLayout(tuple(positions), grid, patch, image_geometry(vlm, im.size)))
    dev = vlm.device
    return VLMInputs(
        input_ids=ids.to(dev),
        attention_mask=enc["attention_mask"].to(dev),
        pixel_values=pix.to(dev, vlm.dtype),
        layouts=tuple(layouts),
        image_sizes=enc["image_sizes"].to(dev) if "image_sizes" in enc else None,
    )
