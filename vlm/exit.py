"""A prefill run layer by layer, from which positions can leave the computation (DyVTE's visual-token exit).

transformers' decoder loop hands every layer the same hidden states, positions and mask, so removing the
image tokens after layer l takes a loop of Lucid's own: `prefill_with_exit` calls the model's own modules
(the multimodal merge, the rotary embedding, each decoder layer, the final norm, the LM head), forked from
none of them, with the seam active in every layer as in `model(...)`.

After each layer, `decide(layer, hidden)` says which rows let their `drop` positions go. A row that goes
has those key columns blocked in every later layer (its queries there still run: rows of one batch must
keep one length); once every row has gone, the positions leave the hidden states, the position ids, the
rotary embeddings and the mask for all later layers (the real exit, where the compute is saved). Layers
up to the exit keep the positions in their KV cache, later layers never hold them (`DynamicCache` keeps
one length per layer); positions are not renumbered, so decoding continues from the original length.
Batch size 1, or rows that all exit at one layer, is the paper's case; a batch whose rows exit at
different layers computes the masked rows until the last one goes (`ExitTrace.tokens` says what ran).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask


class _Embeds(Exception):  # noqa: N818 (control flow: carries the merged embeddings out of the forward)
    def __init__(self, embeds: torch.Tensor) -> None:
        self.embeds = embeds


def merged_embeddings(vlm: Any, model_kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[R, T, D] the text backbone's input embeddings with the image features merged in, as the model's own
    forward builds them (any LLaVA kind): its forward runs up to the backbone's call and stops there."""

    def grab(module, args, kwargs):
        raise _Embeds(kwargs["inputs_embeds"])

    handle = vlm.text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        vlm.model.model(**model_kwargs, use_cache=False)
    except _Embeds as e:
        return e.embeds
    finally:
        handle.remove()
    raise RuntimeError("the multimodal model never called its text backbone")


def _cache_kw(layer: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class ExitTrace:
    """What a prefill with exit ran.

    Attributes:
        exit_layer: [R] long, the layer after which each row's positions left (n_layers: never).
        removed_after: the layer after which the positions left the computation (None: not removed).
        kept: [R, K] long, the original positions computed after `removed_after` (None: not removed).
        drop: [R, N] long, the positions that could leave.
        tokens: the query length each layer ran (the prefill's shape, for FLOPs).
        prompt_length: T, the prompt's length (decoding continues from it).
    """

    exit_layer: torch.Tensor
    removed_after: int | None
    kept: torch.Tensor | None
    drop: torch.Tensor
    tokens: tuple[int, ...]
    prompt_length: int


def _gather_cols(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """x gathered along `dim` per row with idx [R, K] (x's dim 0 is the row)."""
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    view = [idx.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = idx.shape[1]
    return x.gather(dim, idx.view(view).expand(shape))


def block_columns(mask: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of the boolean mask [R, 1, Tq, Tk] with the key columns cols [R, N] of the rows `rows` [R] bool
    blocked (False)."""
    out = mask.clone()
    sel = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
    sel.scatter_(1, cols.clamp_min(0), True)
    sel &= rows[:, None]
    return out & ~sel[:, None, None, :]


@torch.inference_mode()
def prefill_with_exit(
    vlm: Any,
    model_kwargs: dict[str, torch.Tensor],
    position_ids: torch.Tensor,
    cache: Any,
    drop: torch.Tensor,
    decide,
    keep_logits: int = 1,
) -> tuple[torch.Tensor, ExitTrace]:
    """The prefill of `model_kwargs` with the positions `drop` [R, N] leaving after the layer `decide` picks.

    Args:
        position_ids: [R, T] (the attention mask's cumulative sum, as `vlm.decoding.generate` builds them).
        cache: the generation's empty `DynamicCache`; filled per layer (fewer positions past the exit).
        decide: `decide(layer, hidden [R, T, D]) -> [R] bool`, called after each layer but the last while a row
            has not exited (rows already exited are ignored).
        keep_logits: the logits of this many last positions (0: every position computed in the last layer).

    Returns:
        ([R, V] the last position's logits ([R, keep_logits, V] if keep_logits != 1), the `ExitTrace`).
    """
    text = vlm.text_model
    layers = text.layers
    L = len(layers)
    h = merged_embeddings(vlm, model_kwargs)
    R, T, _ = h.shape
    mask = create_causal_mask(
        config=text.config,
        inputs_embeds=h,
        attention_mask=model_kwargs["attention_mask"],
        cache=cache,
        position_ids=position_ids,
        allow_is_causal_skip=False,
    )
    pos = position_ids
    cos, sin = text.rotary_emb(h, position_ids=pos)
    exit_at = torch.full((R,), L, dtype=torch.long, device=h.device)
    removed_after, kept = None, None
    tokens: list[int] = []
    kw = _cache_kw(layers[0])
    for layer_idx, layer in enumerate(layers):
        tokens.append(int(h.shape[1]))
        h = layer(
            h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin), use_cache=True, **{kw: cache}
        )
        if removed_after is not None or layer_idx == L - 1:
            continue
        go = decide(layer_idx, h).to(torch.bool) & (exit_at == L)
        if not bool(go.any()):
            continue
        exit_at[go] = layer_idx
        if bool((exit_at < L).all()):  # every row has gone: the positions leave the computation
            keep = torch.ones(R, T, dtype=torch.bool, device=h.device)
            keep.scatter_(1, drop.clamp_min(0), False)
            kept = torch.stack([torch.nonzero(k).flatten() for k in keep])  # rows drop equally many (checked)
            h = _gather_cols(h, kept, 1)
            pos = pos.gather(1, kept)
            cos, sin = _gather_cols(cos, kept, 1), _gather_cols(sin, kept, 1)
            mask = _gather_cols(_gather_cols(mask, kept, 2), kept, 3)
            removed_after = layer_idx
        else:  # some rows have gone: their columns are blocked from the next layer on
            mask = block_columns(mask, drop, go)
    h = text.norm(h[:, -keep_logits:] if keep_logits else h)
    logits = vlm.model.lm_head(h)
    return (logits[:, -1] if keep_logits == 1 else logits), ExitTrace(
        exit_at, removed_after, kept, drop, tuple(tokens), T
    )


def drop_positions(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """[R, N] the positions of `token_id` in each row (the image tokens), for `prefill_with_exit`.

    Raises:
        ValueError: rows hold different numbers of them (one batch must keep one length after the exit).
    """
    hit = ids == token_id
    counts = hit.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"rows hold different numbers of image tokens ({sorted(set(counts.tolist()))})")
    return torch.stack([torch.nonzero(r).flatten() for r in hit])


def decoder_flops(config: Any, tokens: tuple[int, ...], lm_rows: int = 1) -> int:
    """Multiply-add FLOPs (2 per MAC) of one row's prefill through a Llama-style decoder that ran `tokens[l]`
    positions at layer l (keys = queries at prefill, full T x T score and value products as SDPA computes
    them), plus the LM head on `lm_rows` positions. Norms, rotary and softmax are left out (O(T d))."""
    d = config.hidden_size
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    m = config.intermediate_size
    per_token = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d) + 2 * 3 * d * m
    total = 0
    for t in tokens:
        total += t * per_token + 2 * 2 * heads * t * t * hd
    return total + 2 * lm_rows * d * config.vocab_size
