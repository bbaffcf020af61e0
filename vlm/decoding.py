"""The only place Lucid runs a VLM: prefill + KV-cache decode, greedy or seeded sampling.

A plain loop (gpt-fast style) rather than `model.generate`, so that prefill and every decode step are
timed, the active plan/recorder scope spans exactly the model calls, and left-padded batches give
the same tokens as batch size 1. Position ids follow the attention mask, as transformers' own
generation does (tested against it).

Methods reach this loop only through a prepared `mitigation.Request` (generic: the rows the model
runs, which may include a method's second stream in lockstep; a logits step; what to drop after the
prefill); nothing here knows a particular method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

import mitigation
from mitigation.seam.plan import Plan
from mitigation.seam.recorder import AttentionRecorder
from mitigation.seam.request import Method
from vlm.contract import check_context
from vlm.loader import VLM
from vlm.types import Generation, SamplingParams, Timings, VLMInputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of [B, V] logits (filtered entries -> -inf)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _next_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator] | None
) -> torch.Tensor:
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(_filter(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p), -1)
    # argmax(p / E) with E ~ Exp(1) samples from p (no host sync); one generator per row keeps rows
    # independent of their batch neighbours.
    noise = torch.stack([torch.empty_like(probs[i]).exponential_(generator=g) for i, g in enumerate(generators)])
    return (probs / noise).argmax(-1)


def cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.24, where `past_key_values` is
    deprecated) or `past_key_values` (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate(
    vlm: VLM,
    inputs: VLMInputs,
    sampling: SamplingParams = SamplingParams(),
    plan: Plan | None = None,
    recorder: AttentionRecorder | None = None,
    methods: Sequence[Method] = (),
    on_token: Callable[[int, list[int]], None] | None = None,
    stop: Callable[[], Sequence[bool]] | None = None,
) -> list[Generation]:
    """Generate answers for a batch.

    Args:
        plan: attention edits applied in every model call of this generation (None: baseline).
        methods: registered methods (`mitigation.methods.parse_methods`), composed in order after
            `plan` (`mitigation.seam.request`); their preparatory work is timed as `timings.prepare_s`.
        recorder: receives image-attention rows / hidden states for the prefill and each step.
        on_token: called after each step with (step, the token chosen for each row) as the tokens are
            chosen (streaming); rows already finished get the pad token.
        stop: asked after each step which rows to end now (a client that went away, a passed deadline):
            they end there with finish_reason "cancelled"; once every row has ended the batch stops, so an
            abandoned request does not hold its replica.

    Returns:
        One `Generation` per row, with text (special tokens stripped), token ids, finish reason,
        timings (prefill, per decode step) and the row's ImageLayout.

    Raises:
        ContextLengthError: the longest prompt (image tokens included) + max_new_tokens exceeds the text
            model's max_position_embeddings.
    """
    # ContextLengthError before any work: positions past max_position_embeddings give garbage, not an error
    check_context(int(inputs.attention_mask.sum(-1).max()), sampling.max_new_tokens, vlm.max_positions)
    model, tok, dev = vlm.model, vlm.processor.tokenizer, vlm.device
    eos = model.generation_config.eos_token_id
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id], device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(eos_ids[0])
    B = inputs.batch_size
    generators = None
    if sampling.temperature > 0:
        generators = [torch.Generator(device=dev).manual_seed(sampling.seed) for _ in range(B)]
    request = mitigation.prepare(vlm, inputs, methods, plan)  # methods' preparatory work (timed apart)
    if request.inputs is not inputs:  # a method rebuilt the rows (e.g. a refined image): check them again
        check_context(int(request.inputs.attention_mask.sum(-1).max()), sampling.max_new_tokens, vlm.max_positions)
    mask = request.model_kwargs["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_kw = cache_argument(model)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    cut: list[int | None] = [None] * B  # rows ended by `stop`: how many tokens they had
    out_tokens: list[torch.Tensor] = []
    out_logprobs: list[torch.Tensor] = []
    step_times: list[float] = []
    with mitigation.scope(recorder=recorder, request=request, n_heads=vlm.n_heads, n_layers=vlm.n_layers) as active:
        _sync(dev)
        t0 = time.perf_counter()
        if request.prefill is not None:  # a method's own layer loop (e.g. DyVTE's exit)
            last = request.prefill(request.model_kwargs, position_ids, cache)
        else:
            out = model(
                **request.model_kwargs, position_ids=position_ids, **{cache_kw: cache}, use_cache=True, logits_to_keep=1
            )
            last = out.logits[:, -1]
        logits = request.logits(last)  # [B, V]: the request's rows after any logits step
        nxt = _next_tokens(logits, sampling, generators)
        request.after_prefill(cache, active.keep_rows)  # e.g. drop a second stream used at the first step only
        mask, position_ids = mask[: request.rows], position_ids[: request.rows]
        _sync(dev)
        prefill = time.perf_counter() - t0
        for step in range(sampling.max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out_tokens.append(nxt)
            out_logprobs.append(torch.log_softmax(logits.float(), -1).gather(1, nxt[:, None])[:, 0])
            if on_token is not None:
                on_token(step, nxt.tolist())
            if not sampling.ignore_eos:
                done = done | torch.isin(nxt, eos_ids)
            if stop is not None and any(gone := stop()):
                cut = [step + 1 if c is None and g and not d else c for c, g, d in zip(cut, gone, done.tolist())]
                done = done | torch.tensor(list(gone), dtype=torch.bool, device=dev)
            if step == sampling.max_new_tokens - 1 or bool(done.all()):
                break
            t = time.perf_counter()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            out = model(
                input_ids=request.feed(nxt)[:, None],
                attention_mask=mask,
                position_ids=position_ids,
                **{cache_kw: cache},
                use_cache=True,
            )
            logits = request.logits(out.logits[:, -1])
            nxt = _next_tokens(logits, sampling, generators)
            _sync(dev)
            step_times.append(time.perf_counter() - t)
    timings = Timings(prefill_s=prefill, decode_s=tuple(step_times), prepare_s=request.prepare_s)
    tokens = torch.stack(out_tokens, dim=1).tolist()
    logprobs = torch.stack(out_logprobs, dim=1).tolist()
    eos_set = set(eos_ids.tolist())
    rows: list[list[int]] = []
    reasons = []
    for b in range(B):
        row = []
        reason = "length"
        for t in tokens[b][: cut[b]]:
            if t in eos_set:  # (past the end only with ignore_eos)
                reason = "eos"
                break
            row.append(t)
        if cut[b] is not None:  # ended by `stop`, even where ignore_eos ran past an eos
            reason = "cancelled"
        rows.append(row)
        reasons.append(reason)
    results = []
    for b, row in enumerate(rows):
        text = tok.decode(row, skip_special_tokens=True).strip()
        results.append(
            Generation(
                text=text,
                token_ids=tuple(row),
                finish_reason=reasons[b],
                timings=timings,
                layout=request.inputs.layouts[b],
                token_logprobs=tuple(logprobs[b][: len(row)]),
                eos_logprob=logprobs[b][len(row)] if reasons[b] == "eos" else None,
                extras=request.inputs.extras_of(b),
            )
        )
    return results
