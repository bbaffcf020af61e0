"""Value types of `vlm/`: inputs, sampling settings, generations and their timings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlm.contract import check_sampling
from vlm.layout import ImageLayout


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature == 0 is greedy; otherwise seeded sampling.

    Every batch row draws from its own generator seeded with `seed`, so a request gives the same
    tokens alone or inside a batch.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks); the text still ends at EOS

    def __post_init__(self) -> None:
        # SamplingError (a ValueError): max_new_tokens >= 1, finite temperature >= 0, top_p in (0, 1],
        # top_k >= 0, seed in [0, 2**63 - 1] (what torch.Generator.manual_seed takes)
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(frozen=True)
class RowSource:
    """What one row was built from (`build_inputs`), for methods that rebuild a row (a refined image, another
    instruction): the decoded images (the first is the one the row's `ImageLayout` describes), the user's
    question as given, and the conversation around it."""

    images: tuple[Image.Image, ...]
    question: str
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass(frozen=True)
class VLMInputs:
    """A batch ready for the model (left padded), with one `ImageLayout` per row.

    `sources` (one per row, from `build_inputs`) say what each row was built from; `extras` (one mapping
    per row, empty unless a method's `prepare_inputs` adds one) carry what a method made for the row
    besides the inputs (e.g. CARVE's map, mask and refined image), keyed by method name, to the row's
    `Generation.extras`.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor  # [B, 3, S, S] (LLaVA) or [B, P, 3, S, S] (LLaVA-NeXT); [images, ...] in row order
    layouts: tuple[ImageLayout, ...]
    image_sizes: torch.Tensor | None = None  # LLaVA-NeXT only: [B, 2] (height, width)
    sources: tuple[RowSource, ...] = ()
    extras: tuple[Mapping[str, Any], ...] = ()

    def extras_of(self, row: int) -> Mapping[str, Any]:
        return self.extras[row] if self.extras else {}

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def model_kwargs(self) -> dict:
        kw = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}
        if self.image_sizes is not None:
            kw["image_sizes"] = self.image_sizes
        return kw


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one generate call (shared by the rows of a batch)."""

    prefill_s: float
    decode_s: tuple[float, ...]  # one entry per decode step after the prefill
    prepare_s: float = 0.0  # methods' preparatory work before the prefill (e.g. a vision-tower pass)

    @property
    def decode_per_token_s(self) -> float:
        return sum(self.decode_s) / len(self.decode_s) if self.decode_s else 0.0

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.prefill_s + sum(self.decode_s)

    def to_dict(self) -> dict:
        return {
            "prepare_s": round(self.prepare_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "decode_per_token_s": round(self.decode_per_token_s, 6),
            "decode_steps": len(self.decode_s),
            "total_s": round(self.total_s, 6),
        }


@dataclass(frozen=True)
class Generation:
    """One row's result."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "length" | "cancelled" (generate's `stop`)
    timings: Timings
    layout: ImageLayout
    token_logprobs: tuple[float, ...] = ()  # the model's log-probability of each token (before temperature)
    eos_logprob: float | None = None  # the log-probability of the eos token that ended it ("eos" only)
    extras: Mapping[str, Any] = field(default_factory=dict)  # method name -> what it made for this row

    def extra_records(self) -> dict[str, Any]:
        """The extras as JSON, those that can say (`to_record()`): what CLI, service and eval records carry."""
        return {name: v.to_record() for name, v in self.extras.items() if hasattr(v, "to_record")}
