"""The one seam into transformers: the "lucid" attention function and its mask function.

Registered once in `AttentionInterface` and `AttentionMaskInterface` under the name "lucid" and set
on the text backbone only (`attn_implementation={"text_config": "lucid", "vision_config": "sdpa"}`).
With no active scope, or in a layer the scope does not touch, it is transformers' own sdpa path.
Otherwise the request's hooks may first adjust the layer's mask (a layer past a DyVTE exit holds fewer keys),
then extend the layer's compiled edit (state known only at prefill), the
layer runs `lucid_kernels.edited_attention` if it has an edit (sdpa if not), hooks may then act on the output
before o_proj, and for recorded layers the (edited) image-attention rows are read out. The mask function
is transformers' `sdpa_mask`: registering an attention function without one silently drops the causal mask.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lucid_kernels import attention_rows_reference, edited_attention
from mitigation.seam.context import current
from mitigation.seam.hooks import AttentionCall

ATTN_IMPLEMENTATION = "lucid"


def lucid_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, Tq, D], key/value [B, Hkv, Tk, D] -> [B, Tq, H, D]."""
    active = current()
    layer = getattr(module, "layer_idx", None)
    if active is None or layer is None or not active.touches(layer):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise RuntimeError("Lucid's edited attention is inference-only (dropout > 0 in training mode)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    recorder = active.recorder if active.recorder is not None and active.recorder.wants_attention(layer) else None
    rows_sel = recorder.prefill_rows if recorder is not None else "all"
    edit = active.edit_for(layer, prefill=query.shape[2] > 1)
    hooks = active.attention_hooks.get(layer, ())
    for hook in hooks:  # e.g. a layer that holds fewer keys than the model's mask describes (DyVTE)
        attention_mask = hook.attention_mask(layer, attention_mask, key)
    call = None
    if hooks:
        call = AttentionCall(layer, query, key, attention_mask, scale, active.image_index)
        for hook in hooks:  # composition order: each extends the edit the previous ones left
            edit = hook.edit(call, edit)
    rows = None
    if edit is None:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
        )
        if recorder is not None:
            rows = attention_rows_reference(query, key, attention_mask, scale, active.image_index, rows_sel)
    else:
        out, rows = edited_attention(
            query,
            key,
            value,
            attention_mask,
            scale,
            edit,
            record_index=active.image_index if recorder is not None else None,
            record_rows=rows_sel,
        )
    for hook in hooks:
        out = hook.output(call, out)
    if recorder is not None:
        recorder.add_attention(layer, active.main_rows(rows))
    return out, None


def register() -> None:
    """Register the "lucid" attention + mask functions (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, lucid_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _hidden_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    active = current()
    if active is None:
        return
    index = module.self_attn.layer_idx
    hooks = active.input_hooks.get(index, ())
    wants = active.recorder is not None and active.recorder.wants_hidden(index)
    if not hooks and not wants:
        return
    hidden = args[0] if args else kwargs["hidden_states"]
    for hook in hooks:
        hook.layer_input(index, hidden)
    if wants:
        active.recorder.add_hidden(index, active.main_rows(hidden))


def _final_norm_hook(index: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        active = current()
        if active is not None and active.recorder is not None and active.recorder.wants_hidden(index):
            active.recorder.add_hidden(index, active.main_rows(output))

    return hook


def install_hidden_capture(text_model: nn.Module) -> None:
    """Install stateless hooks on a decoder stack (once, at load time) that feed the *current*
    recorder the hidden state entering each layer and the final normed output.

    The hooks hold no request state: like transformers' own output-capturing hooks, they read the
    ContextVar, and do nothing when no recorder asks for hidden states.
    """
    layers = text_model.layers
    for layer in layers:
        layer.register_forward_pre_hook(_hidden_pre_hook, with_kwargs=True)
    text_model.norm.register_forward_hook(_final_norm_hook(len(layers)))


register()
