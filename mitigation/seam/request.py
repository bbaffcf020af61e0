"""A request: what a list of methods asks of one `generate` call, composed in one documented order.

`prepare(vlm, inputs, methods, plan)` runs each method's preparatory work and returns a `Request`:
the rows the model runs, the composed static `Plan`, the key sets it names, the request hooks (state
computed at prefill) and the logits steps. `generate` enters `mitigation.scope(request=...)` with it
and calls `logits`, `feed` and `after_prefill`; it knows nothing of particular methods.

**Composition order** of `methods = [m1, m2, ...]` (a method may appear once):

1. preparatory work (`prepare_inputs`, then `contribute`) runs in list order;
2. pre-softmax logit edits apply in list order, each to the logits the previous one left (a caller's
   explicit `plan` comes first); hooks' logit edits follow the static ones of the same layer;
3. post-softmax redistributions (VAR) apply after every logit edit (the softmax lies between);
4. per-head output scales multiply (order-free);
5. logits steps (e.g. PAI's image-free guidance) apply in list order, each to the previous result.

**Second streams.** A method may ask for rows run in lockstep with the request's rows in the same
batch (one KV cache holds them all; block k of B rows starts at row B * (k + 1), its row b pairing with
request row b): "strip" removes the image tokens from the prompt (the image-free prompt, text positions
shift), "mean_image" keeps the prompt and replaces the image with the processor's mean colour (all-zero
normalised pixels), "noise" keeps the prompt and diffuses the normalised pixels to step t of VCD's
1000-step schedule (`noised_pixels`). A stream lives until the end of the prefill (VHR: heads chosen
at the first answer step) or of the generation (guidance, VCD: its logits at every step; it is fed the
request's own tokens). The request's attention edits do not reach these rows (key sets are empty there)
unless a method edits them on purpose.

Methods asking for the same stream (equal kind, and for noise equal step and seed) share one block;
different streams get a block each (e.g. `vcd+vhr` runs three blocks at prefill, two after it). Blocks
that live to the end come first, so dropping the prefill-only ones keeps the first rows. Where a block is
shared, two logits steps reading it would apply the same guidance twice, and a method that edits it
cannot be combined with one whose logits step reads it: both are rejected with an error naming the two
methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from lucid.errors import InputError
from mitigation.seam.hooks import Hook
from mitigation.seam.plan import Plan

STREAM_KINDS = ("strip", "mean_image", "noise")
IMAGE_FREE_KINDS = ("strip", "mean_image")  # the streams without the image's content
NOISE_STEPS = 1000  # VCD's diffusion schedule
LogitsStep = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
#: `run(model_kwargs, position_ids, cache) -> [R, V]` the last position's logits: a prefill of the method's own
PrefillRun = Callable[[Mapping[str, torch.Tensor], torch.Tensor, Any], torch.Tensor]


class Method(Protocol):
    """What the seam needs of a method (`mitigation.methods.registry.Method` is the registry's base class):
    a name for messages, optional input rewriting, an optional second stream, and its contribution."""

    name: str

    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any: ...

    def second_stream(self) -> SecondStream | None: ...

    def contribute(self, ctx: RequestContext) -> Contribution: ...


class CompositionError(InputError):
    """Methods that cannot be honoured together (the message names both); a caller's mistake."""


@dataclass(frozen=True)
class SecondStream:
    """A method's need for a second stream of rows (see the module docstring).

    Attributes:
        kind: "strip", "mean_image" or "noise".
        until: "prefill" (dropped after the first answer step) or "end".
        edited: the method edits these rows (they are then not the plain model's).
        read_by_logits: the method's logits step reads these rows' logits.
        noise_step: "noise" only: the diffusion step t in [0, 999].
        noise_seed: "noise" only: the seed of the Gaussian noise (the same noise for every row).
    """

    kind: str
    until: str
    edited: bool = False
    read_by_logits: bool = False
    noise_step: int = 0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"second stream kind must be one of {', '.join(STREAM_KINDS)}, got {self.kind!r}")
        if self.until not in ("prefill", "end"):
            raise ValueError(f"second stream 'until' must be 'prefill' or 'end', got {self.until!r}")
        if not 0 <= self.noise_step < NOISE_STEPS:
            raise ValueError(f"noise_step must be in [0, {NOISE_STEPS - 1}], got {self.noise_step}")

    @property
    def identity(self) -> tuple:
        """Streams with equal identity are the same rows (shared by the methods asking for them)."""
        return (self.kind, self.noise_step, self.noise_seed) if self.kind == "noise" else (self.kind,)

    def describe(self) -> str:
        return f"noise@{self.noise_step}" if self.kind == "noise" else self.kind


@dataclass(frozen=True)
class Contribution:
    """What one method adds to a request.

    Attributes:
        plan: static edits (layers -> LayerEdits naming key sets).
        key_sets: name -> [R, T] bool masks the plan names (namespaced "method.set"; "image" is built in).
        hook: per-request state acting during the forward (`mitigation.seam.hooks.Hook`), or None.
        logits: `step(main [B, V], second [B, V] | None) -> [B, V]` applied before each token is chosen.
        prefill: the prefill run by the method's own layer loop instead of `model(...)` (`PrefillRun`; DyVTE:
            positions leave after an exit layer), or None. It calls the model's own layers, so the seam (and
            any hook) is active in every layer; at most one method of a request may bring one.
    """

    plan: Plan = field(default_factory=Plan)
    key_sets: Mapping[str, torch.Tensor] = field(default_factory=dict)
    hook: Hook | None = None
    logits: LogitsStep | None = None
    prefill: PrefillRun | None = None


@dataclass(frozen=True)
class RequestContext:
    """What a method sees when it contributes to a request.

    Attributes:
        vlm: the loaded model (`vlm.VLM`: model, processor, n_layers, n_heads, image_token_id, kind).
        inputs: the request's own rows (`vlm.VLMInputs`, after any `prepare_inputs`).
        model_kwargs: what the model runs at prefill: the request's rows, then any second stream's.
        n_main: the request's rows (B); rows n_main.. are second streams' blocks.
        image_mask: [R, T] bool, the image tokens of the request's rows (second-stream rows: none).
        row_start: [R] long, the first prompt position after the image per row (second stream: T).
        stream_start: the first row of this method's own second stream (None: it asked for none);
            its rows are stream_start .. stream_start + n_main.
    """

    vlm: Any
    inputs: Any
    model_kwargs: Mapping[str, torch.Tensor]
    n_main: int
    image_mask: torch.Tensor
    row_start: torch.Tensor
    stream_start: int | None = None

    @property
    def rows(self) -> int:
        return int(self.model_kwargs["input_ids"].shape[0])

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.model_kwargs["attention_mask"]

    @property
    def n_layers(self) -> int:
        return int(self.vlm.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.vlm.n_heads)

    @property
    def device(self) -> torch.device:
        return self.image_mask.device

    def main_rows(self) -> torch.Tensor:
        """[R] bool: True on the request's own rows."""
        m = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
        m[: self.n_main] = True
        return m


class Request:
    """A prepared request (see the module docstring). Built by `prepare`; one per `generate` call.

    Attributes:
        model_kwargs: the prefill's model inputs (all rows).
        n_main: the request's own rows.
        rows: the rows the model runs now (fewer once the prefill-only streams are dropped).
        image_mask: [R, T] image tokens of the request's rows only.
        plan, key_sets, hooks, logits_steps: the composed contributions.
        streams: the second streams, one block of n_main rows each, in row order.
        methods: the methods, in order.
        prepare_s: seconds spent in preparatory work (vision-tower passes, calibration look-ups).
        inputs: the request's rows after every `prepare_inputs` (their layouts and extras are the answer's).
        prefill: a method's own prefill run (`Contribution.prefill`), or None (the model's forward).
    """

    def __init__(
        self,
        model_kwargs: Mapping[str, torch.Tensor],
        n_main: int,
        image_mask: torch.Tensor,
        plan: Plan,
        key_sets: Mapping[str, torch.Tensor],
        hooks: tuple[Hook, ...],
        logits_steps: tuple[tuple[LogitsStep, int | None], ...],
        streams: tuple[SecondStream, ...] = (),
        methods: tuple[Method, ...] = (),
        prepare_s: float = 0.0,
        inputs: Any = None,
        prefill: PrefillRun | None = None,
    ) -> None:
        self.inputs = inputs
        self.prefill = prefill
        self.model_kwargs = dict(model_kwargs)
        self.n_main = n_main
        self.rows = int(self.model_kwargs["input_ids"].shape[0])
        self.image_mask = image_mask
        self.plan = plan
        self.key_sets = dict(key_sets)
        self.hooks = hooks
        self.logits_steps = logits_steps  # (step, the first row of the stream it reads, or None)
        self.streams = streams
        self.methods = methods
        self.prepare_s = prepare_s

    @property
    def has_stream(self) -> bool:
        return self.rows > self.n_main

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, V] next-token logits of every row -> [B, V] of the request's rows after every logits step."""
        main = logits[: self.n_main]
        for step, start in self.logits_steps:
            second = logits[start : start + self.n_main] if start is not None and start < self.rows else None
            main = step(main, second)
        return main

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] chosen tokens -> [R] tokens for every row (each stream's rows follow their request rows)."""
        return tokens.repeat(self.rows // self.n_main)

    def after_prefill(self, cache: Any, keep_rows: Callable[[int], None]) -> None:
        """Drop the streams that live until the prefill only (the last blocks): from the KV cache, and
        through `keep_rows(n)` (the scope's `Active.keep_rows`) from the per-request state."""
        keep = self.n_main * (1 + sum(s.until == "end" for s in self.streams))
        if self.rows > keep:
            cache.batch_select_indices(torch.arange(keep, device=self.image_mask.device))
            keep_rows(keep)
            self.rows = keep


def _check_shared(streams: list[tuple[Method, SecondStream]]) -> None:
    """The rules for methods sharing one stream's rows."""
    for i, (a, sa) in enumerate(streams):
        for b, sb in streams[i + 1 :]:
            if sa.read_by_logits and sb.read_by_logits:
                raise CompositionError(
                    f"{a.name} and {b.name} both guide by the same {sa.describe()} stream (the guidance would apply "
                    f"twice); set gamma=1 on one of them"
                )
            for x, sx, y, sy in ((a, sa, b, sb), (b, sb, a, sa)):
                if sx.edited and sy.read_by_logits:
                    raise CompositionError(
                        f"{x.name} edits the {sx.describe()} stream whose logits {y.name} reads, so {y.name} would not "
                        f"contrast with the plain model; give {x.name} another free_stream or set "
                        f"{x.name}:scale_free_stream=false to combine them"
                    )


def _plan_streams(methods: Sequence[Method]) -> tuple[tuple[SecondStream, ...], dict[str, int]]:
    """The streams' blocks in row order (those living to the end first) and each asking method's block."""
    groups: dict[tuple, list[tuple[Method, SecondStream]]] = {}
    for m in methods:
        if (s := m.second_stream()) is not None:
            groups.setdefault(s.identity, []).append((m, s))
    merged = []
    for members in groups.values():
        _check_shared(members)
        first = members[0][1]
        merged.append(
            (
                SecondStream(
                    kind=first.kind,
                    until="end" if any(s.until == "end" for _, s in members) else "prefill",
                    edited=any(s.edited for _, s in members),
                    read_by_logits=any(s.read_by_logits for _, s in members),
                    noise_step=first.noise_step,
                    noise_seed=first.noise_seed,
                ),
                [m.name for m, _ in members],
            )
        )
    merged.sort(key=lambda sm: sm[0].until != "end")  # stable: the end blocks first, then in order of asking
    block = {name: k for k, (_, names) in enumerate(merged) for name in names}
    return tuple(s for s, _ in merged), block


def _left_pad(rows: list[torch.Tensor], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, length - r.numel() :] = r
        mask[i, length - r.numel() :] = 1
    return ids, mask


def noise_schedule() -> torch.Tensor:
    """[1000] sqrt of the cumulative alpha product of VCD's diffusion schedule: betas = sigmoid(linspace(-6, 6,
    1000)) scaled to [1e-5, 5e-3] (DAMO-NLP-SG/VCD vcd_utils/vcd_add_noise.py), in float64."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, 0).sqrt()


def noised_pixels(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps on the normalised pixels, eps ~ N(0, I) from
    `seed` (one draw of one image's shape, the same for every row, so a row's noise does not depend on its
    batch neighbours)."""
    a = noise_schedule()[step]
    g = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(pixels.shape[1:], generator=g, dtype=torch.float32).to(pixels.device)
    out = a * pixels.double() + (1 - a * a).sqrt() * eps.double()
    return out.to(pixels.dtype)


def _stream_block(vlm: Any, base: Mapping[str, torch.Tensor], stream: SecondStream) -> dict[str, torch.Tensor]:
    """One stream's rows as model kwargs (pixel_values only where the rows hold image tokens)."""
    ids, mask = base["input_ids"], base["attention_mask"]
    out = {"input_ids": ids, "attention_mask": mask}
    if stream.kind == "strip":  # the prompt without its image tokens, left padded to the request's length
        tok = vlm.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        image = ids == vlm.image_token_id
        free = [ids[b][mask[b].bool() & ~image[b]] for b in range(ids.shape[0])]
        free_ids, free_mask = _left_pad(free, ids.shape[1], int(pad))
        return {"input_ids": free_ids, "attention_mask": free_mask.to(mask.dtype)}
    pixels = base["pixel_values"]
    if stream.kind == "mean_image":
        out["pixel_values"] = torch.zeros_like(pixels)
    else:
        out["pixel_values"] = noised_pixels(pixels, stream.noise_step, stream.noise_seed)
    if "image_sizes" in base:
        out["image_sizes"] = base["image_sizes"]
    return out


def stream_rows(vlm: Any, inputs: Any, streams: str | Sequence[SecondStream]) -> dict[str, torch.Tensor]:
    """The request's rows followed by one block per stream (a kind name: that one stream), as model kwargs
    (prefill)."""
    if isinstance(streams, str):
        streams = (SecondStream(streams, until="end"),)
    base = inputs.model_kwargs()
    blocks = [base] + [_stream_block(vlm, base, s) for s in streams]
    out = {k: torch.cat([b[k] for b in blocks]) for k in ("input_ids", "attention_mask")}
    for k in ("pixel_values", "image_sizes"):
        if k in base:  # in row order, only the blocks whose rows hold image tokens
            out[k] = torch.cat([b[k] for b in blocks if k in b])
    return out


def _row_start(ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[R] the first position after the last image token per row (T where a row has none)."""
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device).expand_as(ids)
    last = torch.where(image, pos, torch.full_like(pos, -1)).amax(1)
    return torch.where(last >= 0, last + 1, torch.full_like(last, T))


def _check_names(methods: Sequence[Method]) -> None:
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise CompositionError(f"{m.name} is given twice; give each method once (with the parameters wanted)")
        seen.add(m.name)
    own = [m for m in methods if getattr(m, "own_prefill", False)]
    for m in methods:
        if own and m is not own[0] and not getattr(m, "logits_only", False):
            raise _prefill_conflict(own[0].name, m.name)
    looking = [m.name for m in methods if getattr(m, "looks_again", False)]
    if len(looking) > 1:
        raise CompositionError(
            f"{looking[0]} and {looking[1]} both choose where to look again from the model's attention and rebuild "
            "the request around it; use one of them"
        )


def check_composition(methods: Sequence[Method]) -> tuple[SecondStream, ...]:
    """What can be checked without a model (so front ends refuse before any work): each method given once,
    and second streams that can be shared. Returns the streams' blocks in row order (empty: none needed).

    Raises:
        CompositionError: naming the two methods.
    """
    _check_names(methods)
    return _plan_streams(methods)[0]


def prepare(vlm: Any, inputs: Any, methods: Sequence[Method] = (), plan: Plan | None = None) -> Request:
    """Compose `methods` (in order, after an explicit `plan`) into a Request for `inputs`.

    Raises:
        CompositionError: a method given twice, or two methods that cannot be honoured together.
        ValueError: a method cannot apply to this model (e.g. layers out of range).
    """
    t0 = time.perf_counter()
    methods = tuple(methods)
    _check_names(methods)
    streams, block = _plan_streams(methods)  # the composition check and each method's block, at once
    for m in methods:
        inputs = m.prepare_inputs(vlm, inputs)
    n_main = inputs.batch_size
    kwargs = stream_rows(vlm, inputs, streams) if streams else inputs.model_kwargs()
    ids = kwargs["input_ids"]
    image = ids == vlm.image_token_id
    image[n_main:] = False
    if ids.shape[1] != inputs.input_ids.shape[1]:
        raise AssertionError("a second stream may not lengthen the request's rows")
    ctx = RequestContext(vlm, inputs, kwargs, n_main, image, _row_start(ids, image))
    composed = plan if plan is not None else Plan()
    key_sets: dict[str, torch.Tensor] = {}
    hooks: list[Hook] = []
    steps: list[tuple[LogitsStep, int | None]] = []
    contributions = []
    for m in methods:
        start = n_main * (1 + block[m.name]) if m.name in block else None
        c = m.contribute(replace(ctx, stream_start=start))
        contributions.append((m, c))
        for name, mask in c.key_sets.items():
            if name in key_sets or name == "image":
                raise CompositionError(f"{m.name}: key set {name!r} is already defined by another method")
            key_sets[name] = mask
        composed = composed.then(c.plan)
        if c.hook is not None:
            hooks.append(c.hook)
        if c.logits is not None:
            steps.append((c.logits, start))
    prefill = _check_prefill(contributions)
    return Request(
        kwargs,
        n_main,
        image,
        composed,
        key_sets,
        tuple(hooks),
        tuple(steps),
        streams,
        methods,
        prepare_s=time.perf_counter() - t0,
        inputs=inputs,
        prefill=prefill,
    )


def _check_prefill(contributions: Sequence[tuple[Method, Contribution]]) -> PrefillRun | None:
    """The one method's own prefill run, if any. A method bringing one removes positions mid-forward, so
    another method's edits and hooks, which address positions of the full prompt, cannot be honoured with it
    (logits steps and second streams can); refused with both names."""
    runs = [(m, c) for m, c in contributions if c.prefill is not None]
    if not runs:
        return None
    (owner, own), *more = runs
    if more:
        raise CompositionError(f"{owner.name} and {more[0][0].name} each run their own prefill; use one of them")
    for m, c in contributions:
        if m is not owner and (c.hook is not None or c.plan.edits):
            raise _prefill_conflict(owner.name, m.name)
    return own.prefill


def _prefill_conflict(owner: str, other: str) -> CompositionError:
    """Methods that run their own prefill (`own_prefill`, e.g. DyVTE) compose only with `logits_only` ones."""
    return CompositionError(
        f"{owner} and {other} cannot be combined: {owner} removes the image tokens from the computation after "
        f"its exit layer, and {other} edits attention at positions of the full prompt in every layer; use "
        f"{other} alone, or {owner} with logits-only methods (e.g. vcd)"
    )
