"""DyVTE (arXiv 2411.19628, NeurIPS 2025): after the exit layer, every visual token leaves the computation."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from lucid.errors import InputError
from mitigation.methods import exit_rules
from mitigation.methods.exit_rules import ExitHook, features, question_start, saved_share
from mitigation.methods.registry import Method, MethodError, Preset, given_params, param, register
from mitigation.seam.context import current
from mitigation.seam.request import CompositionError, Contribution, RequestContext
from vlm.exit import decoder_flops, drop_positions, prefill_with_exit

RULES = ("router", "static", "attention")


class ExitView:
    """What the exit did for one row (in `Generation.extras["dyvte"]`; filled when the prefill has run).

    Attributes:
        rule: the decision rule; exit_layer: the layer after which the row's image tokens left (None: never);
        removed_after: the layer after which the batch stopped computing them (None: never; later than
        exit_layer where rows of one batch exit at different layers); saved: the share of the row's prefill
        decoder FLOPs saved as run (`vlm.exit.decoder_flops` of the shapes run against the full prefill's);
        saved_alone: what the row's own exit saves at batch size 1 (its unpadded prompt alone). A batch saves
        compute only from its last row's exit, while each row's answer is that of its own exit.
    """

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.exit_layer: int | None = None
        self.removed_after: int | None = None
        self.saved = 0.0
        self.saved_alone = 0.0
        self.flops = 0
        self.full_flops = 0
        self.tokens: tuple[int, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "exit_layer": self.exit_layer,
            "removed_after": self.removed_after,
            "prefill_flops": self.flops,
            "full_prefill_flops": self.full_flops,
            "flops_saved": round(self.saved, 4),
            "flops_saved_alone": round(self.saved_alone, 4),
            "tokens_per_layer": list(self.tokens),
        }


@register("dyvte")
@dataclass(frozen=True)
class DyVTE(Method):
    """DyVTE: decide once, at prefill, after which decoder layer the image tokens may leave; past it they leave
    the hidden states, the position ids / rotary embeddings and the mask of every later layer (a layer loop of
    Lucid's own calling the model's layers, `vlm.exit`); earlier layers keep them in their KV cache, positions
    are not renumbered, decoding continues from the original length with each layer's mask cut to its keys.

    Rules (`rule`): `router` (the paper's: per-layer MLP routers on [mean of the question's hidden states; the
    last prompt token's], exit at the first layer whose logit 1 > logit 0), `static` (one layer per checkpoint,
    the earliest safe for `safe_share` of a calibration set by the paper's label rule), `attention` (exit once
    the last prompt row's image-attention mass stays below tau for m layers from l_min; calibrated the same
    way). `safe` picks the calibration: `paper` (DyVTE's label) or `agreement` (Lucid's, opt-in: the loss
    ratio dropped, see `exit_rules.is_safe`). The routers and calibration come from `lucid dyvte fit` (cached
    per weights hash; the embedded checkpoint's are committed beside it); `layer` (static) or `tau`
    (attention) given explicitly need none.

    Batches: rows exiting at different layers keep one length until the last of them exits (their image
    columns blocked from their own exit on; the compute is saved from the last exit), so batch rows equal
    batch size 1. A second stream follows its request row (VCD's noised rows exit with it); streams without
    the image tokens (PAI's strip) cannot, and attention-editing methods are refused with both names.

    Presets: `official` is the router rule as DoubtedSteam/DyVTE ships it (router hidden size 2048,
    llava/model/language_model/modeling_llama.py; labels argmax agreement > 0.99 and loss ratio < 1.03,
    llava/train/train_visual_gate.py); the paper's text describes the same method, so `paper` equals it.
    The official router weights are not released: Lucid trains its own.
    """

    paper: ClassVar[str] = (
        "Wu, Lin, Ye, Zhou, Sun, Ji. Accelerating Multimodal Large Language Models via Dynamic Visual-Token Exit "
        "and the Empirical Findings. NeurIPS 2025, arXiv:2411.19628"
    )
    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {"rule": "router"},
            "DoubtedSteam/DyVTE llava/model/language_model/modeling_llama.py (routers, exit at logit 1 > logit 0, "
            "prefill only), llava/train/train_visual_gate.py (labels: agreement > 0.99, loss ratio < 1.03)",
        ),
        "paper": Preset({"rule": "router"}, "arXiv:2411.19628 §3 (the same routers and labels as the code)"),
    }

    own_prefill: ClassVar[bool] = True  # composes with logits_only methods only (`mitigation.seam.request`)

    rule: str = param("router", "decision rule: router (the paper's), static or attention", choices=RULES)
    safe: str = param(
        "paper",
        "the exit label the rule was fitted to: paper (agreement > 0.99 and loss ratio < 1.03) or agreement (Lucid's: "
        "the greedy answer unchanged)",
        choices=exit_rules.LABELS,
    )
    layer: int | None = param(
        None, "static: exit after this layer (>= the last layer: never); default calibrated", min=0
    )
    tau: float | None = param(None, "attention: the mass threshold; default calibrated", min=0.0, max=1.0)
    m: int | None = param(None, "attention: consecutive layers below tau; default calibrated", min=1)
    l_min: int | None = param(None, "attention: the first layer that may exit; default calibrated", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        given = given_params()
        if "rule" not in given:  # a static layer or an attention threshold given names its rule
            if self.layer is not None:
                object.__setattr__(self, "rule", "static")
            elif self.tau is not None:
                object.__setattr__(self, "rule", "attention")
        stray = {
            "static": ("tau", "m", "l_min"),
            "attention": ("layer",),
            "router": ("layer", "tau", "m", "l_min"),
        }[self.rule]
        bad = [k for k in stray if getattr(self, k) is not None]
        if bad:
            raise MethodError(f"dyvte:rule={self.rule} takes no {', '.join(bad)}")

    def prepare_inputs(self, vlm: Any, inputs: Any) -> Any:
        extras = tuple({**inputs.extras_of(b), self.name: ExitView(self.rule)} for b in range(inputs.batch_size))
        return replace(inputs, extras=extras)

    def _calibration(self, vlm: Any) -> exit_rules._Found:
        found = exit_rules.find(vlm, self.safe)
        if found is None:
            raise MethodError(
                f"dyvte:rule={self.rule},safe={self.safe} needs this checkpoint's calibration: run "
                f"`lucid dyvte fit --model {vlm.path}` (or give dyvte:layer=K / dyvte:tau=T explicitly)"
            )
        return found

    def _decide(self, ctx: RequestContext, hook: ExitHook, last: torch.Tensor):
        n_main = ctx.n_main
        reps = ctx.rows // n_main
        if self.rule == "static":
            k = self.layer if self.layer is not None else self._calibration(ctx.vlm).calibration.static_layer
            return lambda layer, h: torch.full((h.shape[0],), layer == k, dtype=torch.bool, device=h.device)
        if self.rule == "attention":
            if self.tau is None:
                cal = self._calibration(ctx.vlm).calibration
                tau, m, l_min = cal.tau, cal.m, cal.l_min
            else:
                tau, m, l_min = self.tau, 1, 0
            m = self.m if self.m is not None else m
            l_min = self.l_min if self.l_min is not None else l_min
            run = torch.zeros(ctx.rows, dtype=torch.long, device=ctx.device)

            def by_mass(layer: int, h: torch.Tensor) -> torch.Tensor:
                below = hook.masses[layer][:n_main] < tau
                run[:n_main] = torch.where(below, run[:n_main] + 1, torch.zeros_like(run[:n_main]))
                return ((run[:n_main] >= m) & (layer >= l_min)).repeat(reps)

            return by_mass
        found = self._calibration(ctx.vlm)
        if found.routers is None:
            raise MethodError(
                f"dyvte:rule=router: no routers for this checkpoint in {found.where}; run `lucid dyvte fit`"
            )
        routers = found.routers.to(ctx.device)
        qs = question_start(ctx.model_kwargs["input_ids"], ctx.vlm.image_token_id)
        scale = getattr(routers, "input_scale", 1.0)

        def by_router(layer: int, h: torch.Tensor) -> torch.Tensor:
            f = features(h[:n_main], qs[:n_main], last[:n_main]) / scale
            return routers.exits(layer, f).repeat(reps)

        return by_router

    def contribute(self, ctx: RequestContext) -> Contribution:
        vlm = ctx.vlm
        ids = ctx.model_kwargs["input_ids"]
        try:
            drop = drop_positions(ids, vlm.image_token_id)
        except ValueError as e:
            raise CompositionError(
                f"dyvte: {e}: every row of a batch must let go of as many positions (a second stream without the "
                "image, e.g. pai's strip stream, cannot exit with its request row; LLaVA-NeXT images of different "
                "sizes: one request per image)"
            ) from None
        last = torch.full((ctx.rows,), ids.shape[1] - 1, dtype=torch.long, device=ctx.device)  # left padded
        hook = ExitHook(ctx.n_layers, drop, read_at=last if self.rule == "attention" else None)
        decide = self._decide(ctx, hook, last)
        views = [ctx.inputs.extras_of(b).get(self.name) for b in range(ctx.n_main)]
        cfg = vlm.model.config.text_config

        def run(model_kwargs, position_ids, cache) -> torch.Tensor:
            active = current()
            if active is not None and active.recorder is not None:
                raise InputError("dyvte cannot record attention or hidden states: the image tokens leave mid-forward")
            logits, trace = prefill_with_exit(vlm, dict(model_kwargs), position_ids, cache, drop, decide)
            hook.trace = trace
            full = decoder_flops(cfg, (trace.prompt_length,) * ctx.n_layers)
            ran = decoder_flops(cfg, trace.tokens)
            mask = model_kwargs.get("attention_mask")
            for b, view in enumerate(views):
                if isinstance(view, ExitView):
                    e = int(trace.exit_layer[b])
                    view.exit_layer = e if e < ctx.n_layers else None
                    view.removed_after = trace.removed_after
                    view.flops, view.full_flops, view.tokens = ran, full, trace.tokens
                    view.saved = 1 - ran / full
                    length = int(mask[b].sum()) if mask is not None else trace.prompt_length
                    view.saved_alone = saved_share(cfg, length, trace.drop.shape[1], e, ctx.n_layers)
            return logits

        return Contribution(hook=hook, prefill=run)


__all__ = ["DyVTE", "ExitView", "saved_share"]
