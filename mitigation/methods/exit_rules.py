"""When the image tokens may leave: DyVTE's three decision rules, their labels, calibration and routers.

The label (DyVTE's pseudo-label, arXiv 2411.19628, DoubtedSteam/DyVTE llava/train/train_visual_gate.py):
exiting after layer k is *safe* for a sample iff, teacher-forcing its answer, the argmax of the exited model
agrees with the full model's on more than 99 % of the answer positions AND the exited model's mean answer
cross-entropy is below 1.03 x the full model's. `collect` computes it for every layer of every sample
(one full prefill plus one exited prefill per layer, `vlm.exit.prefill_with_exit`; nothing is trained
through the VLM), with the features the rules read:

* `static`: one exit layer per checkpoint, the earliest layer safe for at least `safe_share` of the
  calibration samples (`fit_static`);
* `attention`: exit after the first layer >= l_min at which the last prompt row's head-mean attention mass
  on the image has stayed below tau for m consecutive layers (`fit_attention` picks (tau, m, l_min) saving
  the most layers with `safe_share` of the samples safe at their exit);
* `router`: the paper's per-layer router, an MLP without biases on [mean of the question's hidden states;
  the last prompt token's] (2d -> hidden -> 2, GELU), exit when logit 1 > logit 0 (`train_routers`).

Answers: the calibration teacher-forces the model's own greedy answer (Lucid's choice: no answers are
needed, and the label then says exactly whether the exit changes what this model says); the paper uses
the instruction data's answers. Router training: the paper samples one exit layer per step and trains that
layer's router on the step's labels; since the VLM is frozen and the router inputs detached, Lucid computes
every layer's labels once and trains each router on its own (the same targets, L prefills per sample
instead of 2 per step).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lucid_kernels.reference import repeat_kv
from mitigation.seam.context import scope
from mitigation.seam.hooks import AttentionCall, Hook
from mitigation.seam.plan import Plan
from mitigation.seam.request import Request
from vlm.checkpoint import cache_root, weights_hash
from vlm.exit import ExitTrace, block_columns, drop_positions, prefill_with_exit

log = logging.getLogger(__name__)

AGREEMENT = 0.99  # DyVTE's label: argmax agreement on the answer > this
LOSS_RATIO = 1.03  # and the exited answer loss < this x the full one
SHIPPED_DIR = "dyvte"  # beside the weights: calibration.json, routers.safetensors (not hashed: a sub-folder)


# ------------------------------------------------------------------------------------------- the exit hook


class ExitHook(Hook):
    """The request's per-layer state of an exit.

    At prefill it may measure, per layer, the head-mean attention mass that one query row per batch row
    (`read_at` [R] positions; the last prompt token) puts on the `drop` positions (the attention rule's
    signal; one row of scores per head, never the full matrix). After the prefill (`trace` set) it cuts each
    decode step's mask to the layer's own keys: past `trace.removed_after` the layer holds only the kept
    positions and the generated tokens; before it, rows that exited earlier have the drop columns blocked.
    """

    def __init__(self, n_layers: int, drop: torch.Tensor, read_at: torch.Tensor | None = None) -> None:
        self.attention_layers = frozenset(range(n_layers))
        self.drop = drop
        self.read_at = read_at
        self.masses: dict[int, torch.Tensor] = {}
        self.trace: ExitTrace | None = None

    def edit(self, call: AttentionCall, edit):
        if self.read_at is None or self.trace is not None or call.query.shape[2] != call.key.shape[2]:
            return edit
        if call.query.shape[2] <= int(self.read_at.max()):  # the positions have left: nothing to decide
            return edit
        q, k, mask = call.query, call.key, call.mask
        rows = torch.arange(q.shape[0], device=q.device)
        qr = q[rows, :, self.read_at]  # [R, H, D]
        kr = repeat_kv(k, q.shape[1] // k.shape[1])
        z = torch.einsum("rhd,rhkd->rhk", qr.float(), kr.float()) * call.scale
        if mask is not None:
            allowed = mask[rows, 0, self.read_at]  # [R, Tk]
            z = z.masked_fill(~allowed[:, None, :].bool(), float("-inf"))
        p = torch.softmax(z, -1)
        self.masses[call.layer] = p.gather(-1, self.drop[:, None, :].expand(-1, p.shape[1], -1)).sum(-1).mean(-1)
        return edit

    def attention_mask(self, layer: int, mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
        tr = self.trace
        if tr is None:
            return mask  # the prefill: its own loop builds every layer's mask
        if tr.removed_after is not None and layer > tr.removed_after:
            if mask is None or mask.shape[-1] == key.shape[-2]:
                return mask
            t = mask.shape[-1] - tr.prompt_length
            new = torch.arange(tr.prompt_length, mask.shape[-1], device=mask.device).expand(tr.kept.shape[0], t)
            idx = torch.cat([tr.kept, new], 1)
            return mask.gather(-1, idx[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
        gone = tr.exit_layer < layer
        if not bool(gone.any()):
            return mask
        if mask is None:
            mask = torch.ones(key.shape[0], 1, 1, key.shape[-2], dtype=torch.bool, device=key.device)
        return block_columns(mask.bool(), tr.drop, gone)

    def keep_rows(self, n: int) -> None:
        self.drop = self.drop[:n]
        if self.trace is not None:
            tr = self.trace
            self.trace = ExitTrace(
                tr.exit_layer[:n],
                tr.removed_after,
                tr.kept[:n] if tr.kept is not None else None,
                tr.drop[:n],
                tr.tokens,
                tr.prompt_length,
            )


def features(hidden: torch.Tensor, question_start: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[R, 2d] the router's input: [mean of hidden over positions question_start .. last-1; hidden at last]
    per row (DyVTE: the text after the image up to, not including, the last prompt token)."""
    R, T, _ = hidden.shape
    pos = torch.arange(T, device=hidden.device)[None]
    span = (pos >= question_start[:, None]) & (pos < last[:, None])
    w = span.float() / span.sum(1, keepdim=True).clamp_min(1)
    mean = torch.einsum("rt,rtd->rd", w, hidden.float())
    return torch.cat([mean, hidden[torch.arange(R), last].float()], -1)


class Routers(nn.Module):
    """One router per layer but the last: Linear(2d, hidden, no bias) -> GELU -> Linear(hidden, 2, no bias),
    Xavier-uniform initialised (DyVTE llava/model/language_model/modeling_llama.py, init_weight.py)."""

    def __init__(self, d: int, n_layers: int, hidden: int = 2048) -> None:
        super().__init__()
        self.d, self.n_layers, self.hidden = d, n_layers, hidden
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * d, hidden, bias=False), nn.GELU(), nn.Linear(hidden, 2, bias=False))
            for _ in range(n_layers - 1)
        )
        for net in self.nets:
            for m in net:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)

    def forward(self, layer: int, f: torch.Tensor) -> torch.Tensor:
        """[R, 2d] -> [R, 2] logits (class 1: the image tokens may leave after `layer`)."""
        net = self.nets[layer]
        return net(f.to(net[0].weight.dtype))

    def exits(self, layer: int, f: torch.Tensor) -> torch.Tensor:
        z = self(layer, f)
        return z[:, 1] > z[:, 0]


# ------------------------------------------------------------------------------------------- the labels


LABELS = ("paper", "agreement")


def exit_scores(
    full: torch.Tensor, exited: torch.Tensor, answer: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full / exited logits [R, A, V] at the positions predicting answer [R, A] (valid [R, A] marks each row's own
    answer tokens) -> ([R] the share of answer positions whose argmax agrees, [R] exited / full mean answer CE)."""
    n = valid.sum(1).clamp_min(1)
    agreement = ((full.argmax(-1) == exited.argmax(-1)) & valid).sum(1) / n

    def ce(logits: torch.Tensor) -> torch.Tensor:
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), answer, reduction="none")
        return (nll * valid).sum(1) / n

    return agreement, ce(exited) / ce(full).clamp_min(1e-12)


def is_safe(agreement: torch.Tensor, ratio: torch.Tensor, label: str = "paper") -> torch.Tensor:
    """The label: `paper` (DyVTE's: agreement > 0.99 and loss ratio < 1.03) or `agreement` (Lucid's: agreement
    > 0.99 alone, i.e. the greedy answer is unchanged; the loss ratio is dropped because, on a model that is
    near-certain of its own answer, any change of a near-zero loss exceeds 3 %)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    ok = agreement > AGREEMENT
    return ok & (ratio < LOSS_RATIO) if label == "paper" else ok


@dataclass(frozen=True)
class ExitSample:
    """One calibration sample: an image (path or PIL image) and a question (its answer is the model's)."""

    image: Any
    question: str


@dataclass(frozen=True)
class ExitData:
    """Per sample and exit layer k: agreement and loss ratio [S, L-1] (`exit_scores`), mass [S, L] (the last
    prompt row's image mass per layer), features [S, L-1, 2d] (the router's input after layer k), saved [S, L-1]
    (the share of prefill FLOPs the exit saves)."""

    agreement: torch.Tensor
    ratio: torch.Tensor
    mass: torch.Tensor
    features: torch.Tensor
    saved: torch.Tensor

    def safe(self, label: str = "paper") -> torch.Tensor:
        """[S, L-1] bool: exiting after layer k is safe for the sample (`is_safe`)."""
        return is_safe(self.agreement, self.ratio, label)


def _with_answers(vlm: Any, samples: Sequence[ExitSample], max_new_tokens: int):
    """The samples' prompt rows with the model's greedy answers appended (left padded), and per row the last
    prompt position and the answer length."""
    from vlm.decoding import generate
    from vlm.inputs import build_inputs
    from vlm.types import SamplingParams

    inputs = build_inputs(vlm, [s.image for s in samples], [s.question for s in samples])
    gens = generate(vlm, inputs, SamplingParams(max_new_tokens=max_new_tokens))
    eos = vlm.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    tok = vlm.processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows, answers = [], []
    for b, g in enumerate(gens):
        prompt = inputs.input_ids[b][inputs.attention_mask[b].bool()]
        ans = list(g.token_ids) + ([eos] if g.finish_reason == "eos" else [])
        ans = ans or [eos]
        rows.append(torch.cat([prompt, torch.tensor(ans, dtype=prompt.dtype)]))
        answers.append(ans)
    T = max(r.numel() for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - r.numel() :] = r
        mask[b, T - r.numel() :] = 1
    kwargs = inputs.model_kwargs()
    kwargs["input_ids"], kwargs["attention_mask"] = ids.to(vlm.device), mask.to(vlm.device)
    A = torch.tensor([len(a) for a in answers])
    return kwargs, (T - 1 - A).to(vlm.device), answers


def question_start(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[R] the first position after each row's last image token."""
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device).expand_as(ids)
    last = torch.where(ids == image_token_id, pos, torch.full_like(pos, -1)).amax(1)
    return last + 1


def _prefill(vlm, kwargs, decide, hook):
    from transformers import DynamicCache

    mask = kwargs["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    request = Request(
        kwargs, kwargs["input_ids"].shape[0], kwargs["input_ids"] == vlm.image_token_id, Plan(), {}, (hook,), ()
    )
    with scope(request=request, n_heads=vlm.n_heads, n_layers=vlm.n_layers):
        return prefill_with_exit(
            vlm, kwargs, position_ids, DynamicCache(config=vlm.model.config), hook.drop, decide, keep_logits=0
        )


@torch.inference_mode()
def collect(
    vlm: Any,
    samples: Sequence[ExitSample],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: Callable[[int], None] | None = None,
) -> ExitData:
    """The labels and features of every layer for `samples` (see the module docstring)."""
    from vlm.exit import decoder_flops

    L = vlm.n_layers
    cfg = vlm.model.config.text_config
    agreements, ratios, masses, feats, saved = [], [], [], [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        kwargs, last, answers = _with_answers(vlm, chunk, max_new_tokens)
        ids = kwargs["input_ids"]
        R, T = ids.shape
        drop = drop_positions(ids, vlm.image_token_id)
        qs = question_start(ids, vlm.image_token_id)
        A = max(len(a) for a in answers)
        target = torch.zeros(R, A, dtype=torch.long, device=ids.device)
        valid = torch.zeros(R, A, dtype=torch.bool, device=ids.device)
        for b, a in enumerate(answers):
            target[b, A - len(a) :] = torch.tensor(a, device=ids.device)
            valid[b, A - len(a) :] = True
        layer_feats: dict[int, torch.Tensor] = {}

        def record(layer: int, h: torch.Tensor, feats=layer_feats, qs=qs, last=last) -> torch.Tensor:
            feats[layer] = features(h, qs, last)
            return torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)

        hook = ExitHook(L, drop, read_at=last)
        full, _ = _prefill(vlm, kwargs, record, hook)
        full = full[:, -A - 1 : -1]
        agreement, ratio = torch.zeros(R, L - 1), torch.zeros(R, L - 1)
        for k in range(L - 1):
            exited, trace = _prefill(
                vlm, kwargs, lambda layer, h, k=k: torch.full((h.shape[0],), layer == k), ExitHook(L, drop)
            )
            a, r = exit_scores(full, exited[:, -A - 1 : -1], target, valid)
            agreement[:, k], ratio[:, k] = a.cpu(), r.cpu()
        prompt_T = int(T - A)  # the prompt's length as inference runs it (the answer tokens are not prefilled)
        base = decoder_flops(cfg, (prompt_T,) * L)
        n_img = drop.shape[1]
        saved.append(
            torch.tensor(
                [
                    [
                        1 - decoder_flops(cfg, (prompt_T,) * (k + 1) + (prompt_T - n_img,) * (L - k - 1)) / base
                        for k in range(L - 1)
                    ]
                ]
            ).expand(R, -1)
        )
        agreements.append(agreement)
        ratios.append(ratio)
        masses.append(torch.stack([hook.masses[layer] for layer in range(L)], 1).cpu())
        feats.append(torch.stack([layer_feats[k] for k in range(L - 1)], 1).cpu())
        if progress is not None:
            progress(len(chunk))
    return ExitData(torch.cat(agreements), torch.cat(ratios), torch.cat(masses), torch.cat(feats), torch.cat(saved))


# ------------------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class ExitCalibration:
    """A checkpoint's calibrated exit rules (`fit`), cached per weights hash.

    Attributes:
        static_layer: the `static` rule's exit layer (n_layers - 1: no layer was safe enough, never exits).
        tau, m, l_min: the `attention` rule's threshold, run length and first layer.
        label: the label rule the rules were fitted to (`is_safe`).
        safe_share: the share of calibration samples required safe.
        samples: how many samples calibrated it; calibration: their name.
        safe_by_layer: the share of samples safe at each exit layer (for the docs and `lucid dyvte fit`).
        router_accuracy: held-out accuracy of each layer's router against its labels (None: no routers).
    """

    weights_hash: str
    n_layers: int
    static_layer: int
    tau: float
    m: int
    l_min: int
    label: str
    safe_share: float
    samples: int
    calibration: str
    safe_by_layer: tuple[float, ...] = ()
    router_hidden: int = 0
    router_accuracy: tuple[float, ...] = ()
    router_positive: tuple[float, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ExitCalibration:
        d = json.loads(text)
        for k in ("safe_by_layer", "router_accuracy", "router_positive"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


def fit_static(safe: torch.Tensor, safe_share: float) -> int:
    """safe [S, L-1] -> the earliest exit layer safe for >= safe_share of the samples (L-1, no exit, if none is)."""
    ok = torch.nonzero(safe.float().mean(0) >= safe_share).flatten()
    return int(ok[0]) if ok.numel() else safe.shape[1]


def attention_exit_layer(mass: torch.Tensor, tau: float, m: int, l_min: int) -> torch.Tensor:
    """[S, L] masses -> [S] the first layer l >= max(l_min, m - 1), l < L - 1, whose last m masses are all below
    tau (L - 1: never)."""
    S, L = mass.shape
    below = (mass < tau).float()
    out = torch.full((S,), L - 1, dtype=torch.long)
    for layer in range(L - 2, -1, -1):
        if layer < l_min or layer < m - 1:
            continue
        run = below[:, layer - m + 1 : layer + 1].sum(1) == m
        out = torch.where(run, torch.full_like(out, layer), out)
    return out


def fit_attention(data: ExitData, safe: torch.Tensor, safe_share: float) -> tuple[float, int, int]:
    """(tau, m, l_min) saving the most prefill FLOPs on average with >= safe_share of the samples safe at
    their exit (no exit counts as safe); the thresholds tried are the masses' quantiles."""
    S, L = data.mass.shape
    taus = torch.quantile(data.mass.flatten().float(), torch.linspace(0, 1, 41)).tolist()
    best = (0.0, (0.0, 1, L - 1))
    safe = torch.cat([safe, torch.ones(S, 1, dtype=torch.bool)], 1)
    saved = torch.cat([data.saved, torch.zeros(S, 1)], 1)
    for tau in taus:
        for m in (1, 2, 3):
            for l_min in range(L - 1):
                at = attention_exit_layer(data.mass, tau, m, l_min)
                rows = torch.arange(S)
                if safe[rows, at].float().mean() < safe_share:
                    continue
                gain = float(saved[rows, at].mean())
                if gain > best[0] + 1e-9:
                    best = (gain, (float(tau), m, l_min))
    return best[1]


def train_routers(
    data: ExitData,
    safe: torch.Tensor,
    d: int,
    hidden: int = 2048,
    epochs: int = 50,
    lr: float = 1e-3,
    seed: int = 0,
    holdout: float = 0.2,
) -> tuple[Routers, tuple[float, ...], tuple[float, ...]]:
    """Each layer's router fitted to its labels (cross-entropy, class weights [1, 1] as the official code;
    AdamW, full batch). Returns the routers (trained on every sample after the held-out accuracy is measured
    on a `holdout` split), the held-out accuracy per layer and the share of safe labels per layer."""
    g = torch.Generator().manual_seed(seed)
    S, Lm1, _ = data.features.shape
    order = torch.randperm(S, generator=g)
    n_hold = int(round(S * holdout))
    hold, train = order[:n_hold], order[n_hold:]
    scale = data.features.float().std(0, keepdim=True).mean().clamp_min(1e-6)  # one scalar: keeps the rule
    x_all = data.features.float() / scale
    y_all = safe.long()

    def fit(rows: torch.Tensor) -> Routers:
        torch.manual_seed(seed)
        routers = Routers(d, Lm1 + 1, hidden)
        opt = torch.optim.AdamW(routers.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(epochs):
            opt.zero_grad()
            loss = sum(nn.functional.cross_entropy(routers(k, x_all[rows, k]), y_all[rows, k]) for k in range(Lm1))
            loss.backward()
            opt.step()
        return routers

    acc = []
    if n_hold:
        probe = fit(train)
        with torch.no_grad():
            for k in range(Lm1):
                acc.append(float((probe.exits(k, x_all[hold, k]).long() == y_all[hold, k]).float().mean()))
    routers = fit(order)
    routers.input_scale = float(scale)
    return routers, tuple(acc), tuple(float(v) for v in safe.float().mean(0))


# ------------------------------------------------------------------------------------------- storage


def cache_dir_for(vlm: Any, cache_dir: str | os.PathLike | None = None) -> Path:
    digest = weights_hash(vlm.path, cache_dir)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "dyvte" / digest


def save(out: Path, calibration: ExitCalibration, routers: Routers | None = None) -> Path:
    """Write calibration-{label}.json (and routers-{label}.safetensors) into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    label = calibration.label
    (out / f"calibration-{label}.json").write_text(calibration.to_json())
    if routers is not None:
        state = {k: v.detach().contiguous() for k, v in routers.state_dict().items()}
        meta = {
            "d": str(routers.d),
            "n_layers": str(routers.n_layers),
            "hidden": str(routers.hidden),
            "input_scale": repr(getattr(routers, "input_scale", 1.0)),
        }
        save_file(state, out / f"routers-{label}.safetensors", metadata=meta)
    return out


def load_routers(path: Path) -> Routers:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    routers = Routers(int(meta["d"]), int(meta["n_layers"]), int(meta["hidden"]))
    routers.load_state_dict(state)
    routers.input_scale = float(meta.get("input_scale", "1.0"))
    return routers.eval()


@dataclass
class _Found:
    calibration: ExitCalibration
    routers: Routers | None = None
    where: Path = field(default_factory=Path)


_MEMO: dict[tuple[str, str], _Found] = {}


def find(vlm: Any, label: str = "paper", cache_dir: str | os.PathLike | None = None) -> _Found | None:
    """The checkpoint's calibration (and routers) for `label`: shipped beside its weights (`dyvte/`) if for
    exactly these weights, else in the cache; None if neither has one."""
    digest = weights_hash(vlm.path, cache_dir)
    if (digest, label) in _MEMO:
        return _MEMO[digest, label]
    for where in (Path(vlm.path) / SHIPPED_DIR, cache_dir_for(vlm, cache_dir)):
        f = where / f"calibration-{label}.json"
        if f.is_file():
            cal = ExitCalibration.from_json(f.read_text())
            if cal.weights_hash != digest:
                continue
            r = where / f"routers-{label}.safetensors"
            found = _Found(cal, load_routers(r) if r.is_file() else None, where)
            _MEMO[digest, label] = found
            return found
    return None


def fit(
    vlm: Any,
    samples: Sequence[ExitSample],
    name: str,
    labels: Sequence[str] = LABELS,
    safe_share: float = 0.95,
    routers: bool = True,
    hidden: int = 2048,
    epochs: int = 50,
    batch_size: int = 16,
    out: Path | None = None,
    progress: Callable[[int], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[ExitCalibration], Path]:
    """Label `samples` once (`collect`), then for each label rule calibrate the static and attention rules and
    train the routers; written to `out` (default: the cache for these weights)."""
    data = collect(vlm, samples, batch_size=batch_size, progress=progress)
    where = out if out is not None else cache_dir_for(vlm, cache_dir)
    digest = weights_hash(vlm.path, cache_dir)
    cals = []
    for label in labels:
        safe = data.safe(label)
        tau, m, l_min = fit_attention(data, safe, safe_share)
        trained, acc, pos = (None, (), ())
        if routers:
            trained, acc, pos = train_routers(data, safe, vlm.model.config.text_config.hidden_size, hidden, epochs)
        cal = ExitCalibration(
            weights_hash=digest,
            n_layers=vlm.n_layers,
            static_layer=fit_static(safe, safe_share),
            tau=tau,
            m=m,
            l_min=l_min,
            label=label,
            safe_share=safe_share,
            samples=len(samples),
            calibration=name,
            safe_by_layer=tuple(round(float(v), 4) for v in safe.float().mean(0)),
            router_hidden=hidden if routers else 0,
            router_accuracy=tuple(round(a, 4) for a in acc),
            router_positive=tuple(round(p, 4) for p in pos),
        )
        save(where, cal, trained)
        _MEMO.pop((digest, label), None)
        cals.append(cal)
    log.info("dyvte calibration written to %s", where)
    return cals, where


def testbed_samples(n: int = 256, seed: int = 9100) -> list[ExitSample]:
    """Calibration samples from the testbed world (scenes of `seed`, the four question families in turn),
    disjoint from the evaluation suites' seeds."""
    from testbed.world.language import CAPTION_QUESTION, color_question, count_question, existence_question
    from testbed.world.scenes import CATEGORIES, SHAPES, scenes

    out = []
    for i, s in enumerate(scenes(seed, n)):
        kind = i % 4
        if kind == 0:
            q = existence_question(*CATEGORIES[(i // 4) % len(CATEGORIES)])
        elif kind == 1:
            q = color_question(SHAPES[(i // 4) % len(SHAPES)])
        elif kind == 2:
            q = count_question(SHAPES[(i // 4) % len(SHAPES)])
        else:
            q = CAPTION_QUESTION
        out.append(ExitSample(s.image, q))
    return out


def folder_samples(folder: str | os.PathLike) -> list[ExitSample]:
    """Samples from a folder: `questions.jsonl` lines {"image": "name.png", "question": "..."}, images beside it."""
    root = Path(folder)
    qfile = root / "questions.jsonl"
    if not qfile.is_file():
        raise FileNotFoundError(f"{root}: no questions.jsonl (one JSON object per line: image, question)")
    out = []
    for n, line in enumerate(qfile.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(ExitSample(str(root / d["image"]), str(d["question"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{qfile}:{n}: expected {{"image": ..., "question": ...}} ({e})') from None
    if not out:
        raise ValueError(f"{qfile}: no samples")
    return out


def saved_share(config: Any, prompt_length: int, n_drop: int, exit_layer: int, n_layers: int) -> float:
    """The share of prefill FLOPs an exit after `exit_layer` saves for one row (`vlm.exit.decoder_flops`)."""
    from vlm.exit import decoder_flops

    if exit_layer >= n_layers - 1:
        return 0.0
    full = decoder_flops(config, (prompt_length,) * n_layers)
    ran = decoder_flops(
        config, (prompt_length,) * (exit_layer + 1) + (prompt_length - n_drop,) * (n_layers - exit_layer - 1)
    )
    return 1 - ran / full


__all__ = [
    "AGREEMENT",
    "LOSS_RATIO",
    "ExitCalibration",
    "ExitData",
    "ExitHook",
    "ExitSample",
    "Routers",
    "attention_exit_layer",
    "collect",
    "features",
    "find",
    "fit",
    "fit_attention",
    "fit_static",
    "folder_samples",
    "exit_scores",
    "is_safe",
    "saved_share",
    "testbed_samples",
    "train_routers",
]
