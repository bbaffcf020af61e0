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

**The second stream.** A method may ask for rows run in lockstep with the request's rows in the same
batch (batch doubling: row n_main + b pairs with row b; one KV cache holds both): "strip" removes the
image tokens from the prompt (the image-free prompt, text positions shift), "mean_image" keeps the
prompt and replaces the image with the processor's mean colour (all-zero normalised pixels). The
stream lives until the end of the prefill (VHR: heads chosen at the first answer step) or of the
generation (guidance: its logits at every step; it is fed the request's own tokens). The request's
attention edits do not reach these rows (key sets are empty there) unless a method edits them on
purpose. Methods sharing the stream must agree on its kind, and a method that edits it cannot be
combined with one whose logits step reads it: both are rejected with an error naming the two methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lucid.errors import InputError
from mitigation.seam.hooks import Hook
from mitigation.seam.plan import Plan

STREAM_KINDS = ("strip", "mean_image")
LogitsStep = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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
        kind: "strip" or "mean_image".
        until: "prefill" (dropped after the first answer step) or "end".
        edited: the method edits these rows (they are then not the plain model's).
        read_by_logits: the method's logits step reads these rows' logits.
    """

    kind: str
    until: str
    edited: bool = False
    read_by_logits: bool = False

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"second stream kind must be one of {', '.join(STREAM_KINDS)}, got {self.kind!r}")
        if self.until not in ("prefill", "end"):
            raise ValueError(f"second stream 'until' must be 'prefill' or 'end', got {self.until!r}")


@dataclass(frozen=True)
class Contribution:
    """What one method adds to a request.

    Attributes:
        plan: static edits (layers -> LayerEdits naming key sets).
        key_sets: name -> [R, T] bool masks the plan names (namespaced "method.set"; "image" is built in).
        hook: per-request state acting during the forward (`mitigation.seam.hooks.Hook`), or None.
        logits: `step(main [B, V], second [B, V] | None) -> [B, V]` applied before each token is chosen.
    """

    plan: Plan = field(default_factory=Plan)
    key_sets: Mapping[str, torch.Tensor] = field(default_factory=dict)
    hook: Hook | None = None
    logits: LogitsStep | None = None


@dataclass(frozen=True)
class RequestContext:
    """What a method sees when it contributes to a request.

    Attributes:
        vlm: the loaded model (`vlm.VLM`: model, processor, n_layers, n_heads, image_token_id, kind).
        inputs: the request's own rows (`vlm.VLMInputs`, after any `prepare_inputs`).
        model_kwargs: what the model runs at prefill: the request's rows, then any second stream's.
        n_main: the request's rows (B); rows n_main.. are the second stream.
        image_mask: [R, T] bool, the image tokens of the request's rows (second-stream rows: none).
        row_start: [R] long, the first prompt position after the image per row (second stream: T).
    """

    vlm: Any
    inputs: Any
    model_kwargs: Mapping[str, torch.Tensor]
    n_main: int
    image_mask: torch.Tensor
    row_start: torch.Tensor

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
        rows: the rows the model runs now (n_main once a "prefill" stream is dropped).
        image_mask: [R, T] image tokens of the request's rows only.
        plan, key_sets, hooks, logits_steps: the composed contributions.
        methods: the methods, in order.
        prepare_s: seconds spent in preparatory work (vision-tower passes, calibration look-ups).
    """

    def __init__(
        self,
        model_kwargs: Mapping[str, torch.Tensor],
        n_main: int,
        image_mask: torch.Tensor,
        plan: Plan,
        key_sets: Mapping[str, torch.Tensor],
        hooks: tuple[Hook, ...],
        logits_steps: tuple[LogitsStep, ...],
        stream: SecondStream | None,
        methods: tuple[Method, ...] = (),
        prepare_s: float = 0.0,
    ) -> None:
        self.model_kwargs = dict(model_kwargs)
        self.n_main = n_main
        self.rows = int(self.model_kwargs["input_ids"].shape[0])
        self.image_mask = image_mask
        self.plan = plan
        self.key_sets = dict(key_sets)
        self.hooks = hooks
        self.logits_steps = logits_steps
        self.stream = stream
        self.methods = methods
        self.prepare_s = prepare_s

    @property
    def has_stream(self) -> bool:
        return self.rows > self.n_main

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, V] next-token logits of every row -> [B, V] of the request's rows after every logits step."""
        main = logits[: self.n_main]
        second = logits[self.n_main :] if self.has_stream else None
        for step in self.logits_steps:
            main = step(main, second)
        return main

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] chosen tokens -> [R] tokens for every row (the second stream follows its request row)."""
        return torch.cat([tokens, tokens]) if self.has_stream else tokens

    def after_prefill(self, cache: Any, keep_rows: Callable[[int], None]) -> None:
        """Drop a second stream that lives until the prefill only: from the KV cache, and through
        `keep_rows(n)` (the scope's `Active.keep_rows`) from the per-request state."""
        if self.has_stream and self.stream is not None and self.stream.until == "prefill":
            keep = torch.arange(self.n_main, device=self.image_mask.device)
            cache.batch_select_indices(keep)
            keep_rows(self.n_main)
            self.rows = self.n_main


def _check_streams(streams: list[tuple[Method, SecondStream]]) -> SecondStream | None:
    if not streams:
        return None
    for i, (a, sa) in enumerate(streams):
        for b, sb in streams[i + 1 :]:
            if sa.kind != sb.kind:
                raise CompositionError(
                    f"{a.name} and {b.name} need different second streams ({a.name}: {sa.kind}, {b.name}: "
                    f"{sb.kind}); give both the same free_stream"
                )
            if sa.read_by_logits and sb.read_by_logits:
                raise CompositionError(
                    f"{a.name} and {b.name} both guide by the image-free stream (the guidance would apply twice); "
                    f"set gamma=1 on one of them"
                )
            for x, sx, y, sy in ((a, sa, b, sb), (b, sb, a, sa)):
                if sx.edited and sy.read_by_logits:
                    raise CompositionError(
                        f"{x.name} edits the image-free stream whose logits {y.name}'s guidance reads, so {y.name} "
                        f"would not be guided by the plain model; set {x.name}:scale_free_stream=false to combine them"
                    )
    until = "end" if any(s.until == "end" for _, s in streams) else "prefill"
    return SecondStream(
        kind=streams[0][1].kind,
        until=until,
        edited=any(s.edited for _, s in streams),
        read_by_logits=any(s.read_by_logits for _, s in streams),
    )


def _left_pad(rows: list[torch.Tensor], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, length - r.numel() :] = r
        mask[i, length - r.numel() :] = 1
    return ids, mask


def stream_rows(vlm: Any, inputs: Any, kind: str) -> dict[str, torch.Tensor]:
    """The request's rows followed by its second stream's rows of `kind`, as model kwargs (prefill)."""
    base = inputs.model_kwargs()
    ids, mask = base["input_ids"], base["attention_mask"]
    image = ids == vlm.image_token_id
    if kind == "mean_image":
        out = {"input_ids": torch.cat([ids, ids]), "attention_mask": torch.cat([mask, mask])}
        out["pixel_values"] = torch.cat([base["pixel_values"], torch.zeros_like(base["pixel_values"])])
        if "image_sizes" in base:
            out["image_sizes"] = torch.cat([base["image_sizes"], base["image_sizes"]])
        return out
    # "strip": the prompt without its image tokens, left padded to the request's length (never longer)
    tok = vlm.processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    free = [ids[b][mask[b].bool() & ~image[b]] for b in range(ids.shape[0])]
    free_ids, free_mask = _left_pad(free, ids.shape[1], int(pad))
    out = {"input_ids": torch.cat([ids, free_ids]), "attention_mask": torch.cat([mask, free_mask.to(mask.dtype)])}
    out["pixel_values"] = base["pixel_values"]  # only the request's rows hold image tokens
    if "image_sizes" in base:
        out["image_sizes"] = base["image_sizes"]
    return out


def _row_start(ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[R] the first position after the last image token per row (T where a row has none)."""
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device).expand_as(ids)
    last = torch.where(image, pos, torch.full_like(pos, -1)).amax(1)
    return torch.where(last >= 0, last + 1, torch.full_like(last, T))


def check_composition(methods: Sequence[Method]) -> SecondStream | None:
    """What can be checked without a model (so front ends refuse before any work): each method given once,
    and second streams that can be shared. Returns the shared stream (None: no method needs one).

    Raises:
        CompositionError: naming the two methods.
    """
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise CompositionError(f"{m.name} is given twice; give each method once (with the parameters wanted)")
        seen.add(m.name)
    return _check_streams([(m, s) for m in methods if (s := m.second_stream()) is not None])


def prepare(vlm: Any, inputs: Any, methods: Sequence[Method] = (), plan: Plan | None = None) -> Request:
    """Compose `methods` (in order, after an explicit `plan`) into a Request for `inputs`.

    Raises:
        CompositionError: a method given twice, or two methods that cannot be honoured together.
        ValueError: a method cannot apply to this model (e.g. layers out of range).
    """
    t0 = time.perf_counter()
    methods = tuple(methods)
    stream = check_composition(methods)
    for m in methods:
        inputs = m.prepare_inputs(vlm, inputs)
    n_main = inputs.batch_size
    kwargs = stream_rows(vlm, inputs, stream.kind) if stream is not None else inputs.model_kwargs()
    ids = kwargs["input_ids"]
    image = ids == vlm.image_token_id
    image[n_main:] = False
    if ids.shape[1] != inputs.input_ids.shape[1]:
        raise AssertionError("a second stream may not lengthen the request's rows")
    ctx = RequestContext(vlm, inputs, kwargs, n_main, image, _row_start(ids, image))
    composed = plan if plan is not None else Plan()
    key_sets: dict[str, torch.Tensor] = {}
    hooks: list[Hook] = []
    steps: list[LogitsStep] = []
    for m in methods:
        c = m.contribute(ctx)
        for name, mask in c.key_sets.items():
            if name in key_sets or name == "image":
                raise CompositionError(f"{m.name}: key set {name!r} is already defined by another method")
            key_sets[name] = mask
        composed = composed.then(c.plan)
        if c.hook is not None:
            hooks.append(c.hook)
        if c.logits is not None:
            steps.append(c.logits)
    return Request(
        kwargs,
        n_main,
        image,
        composed,
        key_sets,
        tuple(hooks),
        tuple(steps),
        stream,
        methods,
        prepare_s=time.perf_counter() - t0,
    )
