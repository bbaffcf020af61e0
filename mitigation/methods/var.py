"""VAR (ICLR 2025, "See What You Are Told"): visual attention redistribution from sink tokens onto the
image, in image-centric heads; sink dimensions calibrated per backbone."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from lucid_kernels.reference import AttentionEdit, Redistribution
from mitigation.methods.pai import first_edited_layer
from mitigation.methods.registry import Method, MethodError, Preset, param, register, resolve_layers
from mitigation.seam.hooks import AttentionCall, Hook
from mitigation.seam.request import CompositionError, Contribution, RequestContext
from vlm import build_inputs
from vlm.checkpoint import cache_root, weights_hash

log = logging.getLogger(__name__)

PAPER_TAU = 20.0  # chosen on LLaVA-1.5-7B (hidden size 4096)
SEMANTICS = ("paper", "code")
CALIBRATION_QUESTIONS = (
    "Describe the image.",
    "Is there a red circle in the image?",
    "What is in the picture?",
    "How many objects are there?",
)


#: Backbones VAR names, with the official code's constants (seilk/VisAttnSink@98e62d6 src/logic/constants.py:9-10;
#: tau 20 from A_exps/lv1.5_7b.yml:12). Keyed by the text config's (hidden size, layers, MLP width).
BACKBONES: dict[tuple[int, int, int], tuple[str, tuple[int, ...], float]] = {
    (4096, 32, 11008): ("LLaMA-2-7B (LLaVA-1.5-7B)", (1415, 2533), 20.0),
    (5120, 40, 13824): ("LLaMA-2-13B (LLaVA-1.5-13B)", (2100, 4743), 20.0),
}


def named_backbone(text_config: Any) -> tuple[str, tuple[int, ...], float] | None:
    """(name, sink dims, tau) of a backbone VAR publishes constants for, else None."""
    key = tuple(int(getattr(text_config, k, 0) or 0) for k in ("hidden_size", "num_hidden_layers", "intermediate_size"))
    return BACKBONES.get(key)  # type: ignore[arg-type]


def default_tau(hidden_size: int) -> float:
    """Lucid's tau for a backbone VAR publishes nothing for: the paper's tau = 20 as the same fraction of the
    largest possible sink score sqrt(D) (a channel's |x_d| / RMS(x) is at most sqrt(D)): 20 * sqrt(D / 4096);
    3.5 on the testbed's 128 (named backbones use their published 20, 13B included)."""
    return PAPER_TAU * math.sqrt(hidden_size / 4096)


def sink_scores(hidden: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """VAR's sink score phi(x) = max_{d in dims} |x_d| / RMS(x) (RMS without the norm's weight, eps 1e-6):
    [..., D] -> [...]."""
    x = hidden.float()
    rms = x.pow(2).mean(-1).add(1e-6).sqrt()
    return x[..., list(dims)].abs().amax(-1) / rms


@dataclass(frozen=True)
class SinkCalibration:
    """The sink dimensions of one checkpoint and the numbers they were judged by.

    Attributes:
        dims: the massive-activation channels (largest |x_d| / RMS(x) of the first token, middle layers).
        hidden_size: D of the text backbone.
        layers: the middle layers read.
        first_token_score: median over those layers and prompts of the first token's sink score.
        other_tokens_p99: 99th percentile of the other tokens' sink scores (same layers).
        image_sink_share: share of image tokens whose score exceeds default_tau (visual sinks).
        massive: whether the first token is a sink under default_tau (False: no massive activation:
            VAR has little to redistribute on this backbone).
        source: "calibrated" or "explicit".
        weights_hash: the checkpoint's.
    """

    dims: tuple[int, ...]
    hidden_size: int
    layers: tuple[int, ...] = ()
    first_token_score: float = float("nan")
    other_tokens_p99: float = float("nan")
    image_sink_share: float = float("nan")
    massive: bool = False
    source: str = "calibrated"
    weights_hash: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SinkCalibration:
        d = json.loads(text)
        d["dims"], d["layers"] = tuple(d["dims"]), tuple(d["layers"])
        return cls(**d)


def _calibration_images():
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(224, 224, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return [Image.new("RGB", (224, 224), (128, 128, 128)), Image.fromarray(noise)]


@torch.inference_mode()
def calibrate_sinks(vlm: Any, max_dims: int = 4) -> SinkCalibration:
    """Find the sink dimensions of `vlm`'s text backbone: run a few prompts (two images x four questions),
    read the hidden states entering the middle layers [L/4, 3L/4), and take the channels whose median
    |x_d| / RMS(x) on the first token is at least a quarter of the largest (at most `max_dims`)."""

    L = vlm.n_layers
    layers = list(range(L // 4, max(L // 4 + 1, (3 * L) // 4)))
    images = _calibration_images()
    pairs = [(im, q) for im in images for q in CALIBRATION_QUESTIONS]
    inputs = build_inputs(vlm, [p[0] for p in pairs], [p[1] for p in pairs])
    mask = inputs.attention_mask.bool()
    pos = (inputs.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = vlm.model(**inputs.model_kwargs(), position_ids=pos, output_hidden_states=True)
    hs = torch.stack([out.hidden_states[layer].float() for layer in layers])  # [Lm, B, T, D]
    ratio = hs.abs() / hs.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    first = mask.long().argmax(1)  # first valid position per row (left padding)
    b_idx = torch.arange(mask.shape[0])
    first_ratio = ratio[:, b_idx, first]  # [Lm, B, D]
    score = first_ratio.flatten(0, 1).median(0).values  # [D]
    top = score.topk(min(max_dims, score.numel()))
    dims = tuple(int(d) for d, v in zip(top.indices, top.values) if v >= 0.25 * top.values[0])
    phi = sink_scores(hs, dims)  # [Lm, B, T]
    others = mask.clone()
    others[b_idx, first] = False
    image = inputs.input_ids == vlm.image_token_id
    tau = default_tau(hs.shape[-1])
    first_score = float(phi[:, b_idx, first].median())
    return SinkCalibration(
        dims=dims,
        hidden_size=int(hs.shape[-1]),
        layers=tuple(layers),
        first_token_score=first_score,
        other_tokens_p99=float(torch.quantile(phi[:, others].flatten(), 0.99)),
        image_sink_share=float((phi[:, image] > tau).float().mean()),
        massive=first_score > tau,
    )


def calibration_path(vlm: Any, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `vlm`'s sink calibration is (or would be) cached."""
    return _cache_file(vlm, cache_dir)[0]


def _cache_file(vlm: Any, cache_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """Where the calibration of `vlm`'s weights is cached: `cache_dir` or `LUCID_CACHE` (~/.cache/lucid)."""

    digest = weights_hash(vlm.path, cache_dir)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "sinks" / f"{digest[:16]}.json", digest


def save_calibration(vlm: Any, calibration: SinkCalibration, cache_dir: str | os.PathLike | None = None) -> Path:
    path, digest = _cache_file(vlm, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(replace(calibration, weights_hash=digest).to_json())
    tmp.replace(path)
    return path


def load_or_calibrate(
    vlm: Any, cache_dir: str | os.PathLike | None = None, force: bool = False, dims: tuple[int, ...] | None = None
) -> SinkCalibration:
    """The cached sink calibration of `vlm` (per weights hash, under `LUCID_CACHE`/sinks), computed and
    cached on first use; `dims` stores an explicit override instead; `force` recalibrates."""
    path, digest = _cache_file(vlm, cache_dir)
    if dims is not None:
        cal = SinkCalibration(
            dims=tuple(dims), hidden_size=int(vlm.model.config.text_config.hidden_size), source="explicit"
        )
        save_calibration(vlm, cal, cache_dir)
        return replace(cal, weights_hash=digest)
    if path.is_file() and not force:
        return SinkCalibration.from_json(path.read_text())
    cal = calibrate_sinks(vlm)
    save_calibration(vlm, cal, cache_dir)
    log.info("cached VAR sink dimensions %s at %s", cal.dims, path)
    return replace(cal, weights_hash=digest)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


class _Redistribute(Hook):
    """Per request: sink tokens from the hidden state entering each edited layer at prefill (fixed for
    the decode steps: generated tokens never become sinks), then the layer's redistribution."""

    def __init__(
        self,
        layers,
        dims,
        tau,
        fraction,
        min_image,
        min_ratio,
        require_image_sink,
        ctx: RequestContext,
        first_token: bool = True,
    ) -> None:
        self.attention_layers = self.input_layers = frozenset(layers)
        self.first_token = first_token
        self.dims, self.tau = tuple(dims), tau
        self.fraction = torch.full((ctx.n_heads,), fraction, device=ctx.device)
        self.min_image, self.min_ratio, self.require_image_sink = min_image, min_ratio, require_image_sink
        self.image = ctx.image_mask
        self.valid = ctx.attention_mask.bool() & ctx.main_rows()[:, None]
        self.row_start = ctx.row_start
        self.sinks: dict[int, torch.Tensor] = {}  # layer -> [R, T] bool (for inspection)
        self._redist: dict[int, Redistribution] = {}

    def layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        if hidden.shape[1] == 1:
            return  # a decode step: the prefill's sinks stay
        sinks = (sink_scores(hidden, self.dims) > self.tau) & self.valid  # [R, T]
        if self.require_image_sink:  # the official code leaves a layer without visual sinks alone
            sinks = sinks & (sinks & self.image).any(-1, keepdim=True)
        self.sinks[layer] = sinks
        self._redist[layer] = Redistribution(
            source=sinks,
            target=self.image & ~sinks,
            gate_keys=self.image,
            fraction=self.fraction,
            min_gate_mass=self.min_image,
            min_target_ratio=self.min_ratio,
            row_start=self.row_start,
        )

    def edit(self, call: AttentionCall, edit: AttentionEdit | None) -> AttentionEdit | None:
        r = self._redist.get(call.layer)
        if r is None or (call.prefill and not self.first_token):
            return edit
        base = edit if edit is not None else AttentionEdit()
        if base.redistribute is not None:
            raise CompositionError(f"layer {call.layer} already has a post-softmax redistribution; var allows one")
        return replace(base, redistribute=r)

    def keep_rows(self, n: int) -> None:
        self.image, self.valid, self.row_start = self.image[:n], self.valid[:n], self.row_start[:n]
        self.sinks = {k: v[:n] for k, v in self.sinks.items()}
        self._redist = {
            k: replace(
                r, source=r.source[:n], target=r.target[:n], gate_keys=r.gate_keys[:n], row_start=r.row_start[:n]
            )
            for k, r in self._redist.items()
        }


@register("var")
@dataclass(frozen=True)
class VAR(Method):
    """VAR: move part of the attention that image-centric heads give to sink tokens onto the image's other tokens.

    Sink tokens per layer l (prefill only; generated tokens never become sinks): tokens whose hidden
    state entering layer l has sink score phi(x) = max_{d in D_sink} |x_d| / RMS(x) > tau (RMS without
    the norm's weight). D_sink, the backbone's massive-activation channels, come from `lucid calibrate`
    (cached per weights hash) unless `sink_dims` is given; tau defaults to the paper's 20 scaled by
    sqrt(D / 4096). For each query row after the image (question tokens, then every generated token)
    and each head, with post-softmax weights: the head is image-centric for that row when its image
    mass I >= `min_image_attention` and the non-sink share of it N / I >= rho; then a fraction p of the
    mass on every sink token (text and image) is removed and given to the non-sink image tokens in
    proportion to their attention (the row still sums to 1). Layers: [L // 16, L - 1): sinks are
    computed from the paper's third layer on (2 of 32; 1 of the testbed's 6) and the last layer is
    excluded (the paper).

    Presets. `official` (the default) is what seilk/VisAttnSink@98e62d6 runs (A_exps/lv1.5_7b.yml:11-18:
    tau 20, rho 0.5, p 0.6, summ 0.2): its code keeps p of the sink mass and moves 1 - p = 0.4
    (src/logic/logic.py:196-201) and selects a head when its sink share of the image attention is <= rho
    (logic.py:129-136): `semantics="code"`; it leaves a layer without visual sinks untouched (logic.py:125,
    140-141: `require_image_sink=true`) and edits the last layer (its exclusion is shadowed by
    `VARProcessor.except_last_layer = False`, logic.py:148,169: `exclude_last=false`). `paper` is the
    paper's text: p = 0.6 moved, rho the non-sink share >= 0.5 (hallucination), the last layer excluded,
    a layer's text sinks (BOS) donating even without visual sinks. In both, on the backbones VAR names
    (`BACKBONES`: LLaMA-2-7B {1415, 2533}, 13B {2100, 4743}, constants.py:9-10) the sink dims and tau = 20
    are the published ones (the official code, whose `set_llm_name` is never called, would use the 7B dims
    on 13B too); on any other backbone the dims come from `lucid calibrate` and tau from `default_tau`,
    both Lucid's. The official code never resets its per-sample state (sinks of the first sample reused for
    all later ones): here all state lives in the request. Zero strength (p = 0 with paper semantics, p = 1
    with code semantics) is the baseline bit for bit.
    """

    paper: ClassVar[str] = (
        "Kang, Kim, Kim, Hwang. See What You Are Told: Visual Attention Sink in Large Multimodal Models. "
        "ICLR 2025, arXiv:2503.03321"
    )

    PRESETS: ClassVar[dict[str, Preset]] = {
        "official": Preset(
            {
                "p": 0.6,
                "rho": 0.5,
                "min_image_attention": 0.2,
                "semantics": "code",
                "require_image_sink": True,
                "exclude_last": False,
                "first_token": True,
            },
            "seilk/VisAttnSink@98e62d6 A_exps/lv1.5_7b.yml:11-18; src/logic/logic.py:125-148,169,196-210; "
            "src/logic/constants.py:9-10",
        ),
        "paper": Preset(
            {
                "p": 0.6,
                "rho": 0.5,
                "min_image_attention": 0.2,
                "semantics": "paper",
                "require_image_sink": False,
                "exclude_last": True,
                "first_token": True,
            },
            "arXiv:2503.03321 Sec. 4-5 (p = 0.6 moved, rho 0.5 for hallucination, tau 20, last layer excluded)",
        ),
    }

    p: float = param(
        0.6,
        "share of the sink mass: kept (semantics=code) or moved (paper) onto non-sink image tokens",
        min=0.0,
        max=1.0,
    )
    rho: float = param(
        0.5,
        "image-centric head: sink share <= rho (code) / non-sink share >= rho (paper); 0.5 for hallucination",
        min=0.0,
        max=1.0,
    )
    min_image_attention: float = param(0.2, "image-centric head: its image attention >= this", min=0.0, max=1.0)
    tau: float | None = param(
        None, "sink score threshold (default: 20 on a named backbone, else Lucid's 20 * sqrt(D/4096))", min=0.0
    )
    sink_dims: tuple[int, ...] | None = param(
        None, "massive-activation channels (default: a named backbone's, else `lucid calibrate`'s, cached)", min=0
    )
    semantics: str = param(
        "code", "how p and rho read: the official code's (keeps p; sink share) or the paper's", choices=SEMANTICS
    )
    require_image_sink: bool = param(True, "leave layers without visual sinks untouched (the official code)")
    exclude_last: bool = param(False, "leave the last layer untouched (the paper; the code edits it)")
    layers: tuple[int, ...] | None = param(
        None, "edited layers (default: L//16 .. L-1, or .. L-2 with exclude_last)", min=0
    )
    first_token: bool = param(True, "edit at the prefill too (the question rows and the first answer token)")

    @property
    def moved_fraction(self) -> float:
        return self.p if self.semantics == "paper" else 1.0 - self.p

    @property
    def min_nonsink_ratio(self) -> float:
        return self.rho if self.semantics == "paper" else 1.0 - self.rho

    def contribute(self, ctx: RequestContext) -> Contribution:
        L = ctx.n_layers
        stop = L - 1 if self.exclude_last else L
        layers = resolve_layers(self.name, self.layers, list(range(first_edited_layer(L), stop)), L)
        if self.moved_fraction == 0.0 or not layers:
            return Contribution()
        text_config = ctx.vlm.model.config.text_config
        hidden = int(text_config.hidden_size)
        named = named_backbone(text_config)
        if self.sink_dims is not None:
            dims = self.sink_dims
        elif named is not None:
            dims = named[1]
        else:
            cal = load_or_calibrate(ctx.vlm)
            dims = cal.dims
            if not cal.massive and self.tau is None:
                _warn_once(
                    "var: this backbone's first token has no massive activation (sink score "
                    f"{cal.first_token_score:.2f} <= tau {default_tau(hidden):.2f}): few or no sink tokens, "
                    "so VAR changes little; sink_dims / tau override the calibration"
                )
        bad = [d for d in dims if d >= hidden]
        if bad:
            raise MethodError(f"var: sink dimension {bad[0]} is past the text backbone's hidden size {hidden}")
        tau = self.tau if self.tau is not None else (named[2] if named is not None else default_tau(hidden))
        hook = _Redistribute(
            layers,
            dims,
            tau,
            self.moved_fraction,
            self.min_image_attention,
            self.min_nonsink_ratio,
            self.require_image_sink,
            ctx,
            self.first_token,
        )
        return Contribution(hook=hook)
