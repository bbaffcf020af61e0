"""A hallucination-risk score for every answer, from what the recorder sees while it is produced.

Per generated token t (the row that emits it: the last prompt row for token 0, decode step t-1 for
token t), for each recorded layer l, two numbers about the head-mean attention of that row over the
image tokens:

* `share_l`: the attention mass on the image (a token decided from the text prior looks away from it);
* `entropy_l`: the entropy of that mass normalised over the image tokens, divided by log N (1 = spread
  evenly: the row found nothing in particular to look at).

With `use_prompt`, four more per layer describe how the question's own rows (the prompt rows after
the image) looked at the image before any answer: the largest single-cell share and the lowest
normalised entropy over those rows, and their means (a question about an absent object finds no spot
to look at). Optionally (`use_confidence`) the token's own log-probability is appended. A logistic model over
these features (standardised) is fitted per checkpoint on labelled answers (`fit_risk`: on the testbed,
by `lucid testbed calibrate-risk`) and saved as `lucid_risk.json` beside the weights or in the cache.
A token's risk is the model's probability that it is hallucinated; an answer's risk is the mean over
its tokens. Without a fitted model no risk is reported (never an uncalibrated number).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mitigation.seam.recorder import AttentionRecorder

RISK_FILE = "lucid_risk.json"


def token_features(
    recorder: AttentionRecorder,
    layers: Sequence[int],
    n_tokens: Sequence[int],
    prompt_rows: int = 1,
    logprobs: Sequence[Sequence[float]] | None = None,
    text_rows: Sequence[Sequence[int]] | None = None,
) -> list[np.ndarray]:
    """Risk features of every generated token of every batch row.

    Args:
        recorder: a recorder that recorded `layers` (per head or head-mean) during the generation.
        layers: decoder layers to read.
        n_tokens: generated tokens per batch row (eos excluded).
        prompt_rows: prefill rows recorded (1 for `prefill_rows="last"`, the prompt length for "all").
        logprobs: per row, per token log-probabilities (appended as the last feature when given).
        text_rows: per row, the question's prompt positions (adds `prompt_features`, same for every
            token of the answer; needs prompt_rows == the prompt length, i.e. prefill_rows "all").

    Returns:
        per batch row, [n_tokens, F] float64 in the order: share per layer, entropy per layer,
        prompt features (if text_rows), log-probability (if logprobs).
    """
    prompt = prompt_features(recorder, layers, text_rows) if text_rows is not None else None
    shares, entropies = [], []
    for layer in layers:
        rows = recorder.image_attention(layer).float().mean(1)  # [B, S, N]
        rows = rows[:, prompt_rows - 1 :]  # token t <- row t
        mass = rows.sum(-1)  # [B, S]
        p = rows / mass.clamp_min(1e-12)[..., None]
        n = (recorder_image_counts(rows)).clamp_min(2).float()  # [B]
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / n.log()[:, None]
        shares.append(mass)
        entropies.append(ent)
    share = torch.stack(shares, -1).cpu().numpy()  # [B, S, L]
    ent = torch.stack(entropies, -1).cpu().numpy()
    out = []
    for b, k in enumerate(n_tokens):
        f = np.concatenate([share[b, :k], ent[b, :k]], -1).astype(np.float64)
        if prompt is not None:
            f = np.concatenate([f, np.repeat(prompt[b : b + 1], len(f), 0)], -1)
        if logprobs is not None:
            f = np.concatenate([f, np.asarray(logprobs[b][:k], dtype=np.float64)[:, None]], -1)
        out.append(f)
    return out


def prompt_features(
    recorder: AttentionRecorder, layers: Sequence[int], text_rows: Sequence[Sequence[int]]
) -> np.ndarray:
    """How the question's rows looked at the image, per batch row: [B, 4 * len(layers)].

    Needs a recorder with `prefill_rows="all"`; `text_rows[b]` are the prompt positions of row b after
    its image tokens. Per layer: max and mean over those rows of the largest cell share, min and mean
    of the normalised entropy.
    """
    out = []
    for layer in layers:
        rows = recorder.image_attention(layer).float().mean(1)  # [B, S, N]
        n = recorder_image_counts(rows).clamp_min(2).float()
        feats = []
        for b, tr in enumerate(text_rows):
            r = rows[b, list(tr)]  # [R, N]
            p = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
            peak = p.max(-1).values
            ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / n[b].log()
            feats.append(torch.stack([peak.max(), peak.mean(), ent.min(), ent.mean()]))
        out.append(torch.stack(feats))  # [B, 4]
    return torch.cat(out, -1).cpu().numpy().astype(np.float64)


def recorder_image_counts(rows: torch.Tensor) -> torch.Tensor:
    """[B, S, N] recorded rows -> [B] number of image tokens per batch row (padding columns read 0
    in every row)."""
    return (rows.abs().sum(1) > 0).sum(-1)


@dataclass(frozen=True)
class RiskModel:
    """A fitted logistic risk model for one checkpoint.

    Attributes:
        layers: decoder layers whose image attention the features read.
        use_confidence: whether the token log-probability is a feature.
        use_prompt: whether the question rows' features are used (needs prefill_rows="all").
        mean, std: feature standardisation; weights, bias: the logistic model on standardised features.
        weights_hash: the checkpoint it was fitted on.
        calibration: what it was fitted on and its in-sample numbers (free-form, for the record).
    """

    layers: tuple[int, ...]
    use_confidence: bool
    use_prompt: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    weights_hash: str = ""
    calibration: dict | None = None

    @property
    def n_features(self) -> int:
        return (2 + 4 * self.use_prompt) * len(self.layers) + int(self.use_confidence)

    def score(self, features: np.ndarray) -> np.ndarray:
        """[..., F] features -> [...] probability of hallucination."""
        z = (np.asarray(features, np.float64) - np.array(self.mean)) / np.array(self.std)
        return 1.0 / (1.0 + np.exp(-(z @ np.array(self.weights) + self.bias)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RiskModel:
        d = json.loads(text)
        for k in ("layers", "mean", "std", "weights"):
            d[k] = tuple(d[k])
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> RiskModel:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path) -> RiskModel | None:
        """The risk model fitted for a checkpoint (`RISK_FILE` beside its weights), or None."""
        path = Path(checkpoint) / RISK_FILE
        return cls.load(path) if path.is_file() else None


def fit_risk(
    features: np.ndarray,
    labels: np.ndarray,
    layers: Sequence[int],
    use_confidence: bool,
    use_prompt: bool,
    l2: float = 1e-2,
    weights_hash: str = "",
    calibration: dict | None = None,
) -> RiskModel:
    """L2-regularised logistic regression (LBFGS) of `labels` (1 = hallucinated) on `features` [n, F]."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(np.unique(y)) < 2:
        raise ValueError("fit_risk needs [n, F] features and labels of both classes")
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std)
    yt = torch.tensor(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return RiskModel(
        layers=tuple(int(v) for v in layers),
        use_confidence=use_confidence,
        use_prompt=use_prompt,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        weights=tuple(float(v) for v in w.detach()),
        bias=float(b.detach()),
        weights_hash=weights_hash,
        calibration=calibration,
    )


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (probability a positive outscores a negative; ties count half)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def risk_recorder(risk: RiskModel, recorder: AttentionRecorder | None = None) -> AttentionRecorder:
    """The recorder `score_answers` reads: `recorder` when it records what `risk` needs (its layers, with
    prefill_rows "last" or "all" as the model asks), else a head-mean recorder of those layers.

    Raises:
        ValueError: `recorder` is given but cannot feed the risk model.
    """
    rows_needed = "all" if risk.use_prompt else "last"
    if recorder is None:
        return AttentionRecorder(layers=list(risk.layers), prefill_rows=rows_needed, reduce_heads="mean")
    if not all(recorder.wants_attention(layer) for layer in risk.layers) or recorder.prefill_rows not in (
        rows_needed,
        "all",
    ):
        raise ValueError(
            f"the risk model reads layers {list(risk.layers)} with prefill_rows {rows_needed!r}; "
            f"the recorder given records {recorder.prefill_rows!r}"
        )
    return recorder


def score_answers(risk: RiskModel, recorder: AttentionRecorder, inputs, gens) -> list[tuple[float, ...]]:
    """Per generated answer (`vlm.Generation`, one per batch row of `inputs`), each token's risk.

    A token's features come from the row that emits it (the last prompt row for token 0, decode step
    t-1 for token t); an answer cut at eos still has its eos row, so an empty answer has one token.
    """
    n = [max(1, len(g.token_ids)) for g in gens]
    prompt_rows = 1 if recorder.prefill_rows == "last" else inputs.input_ids.shape[1]
    text_rows = None
    if risk.use_prompt:
        T = inputs.input_ids.shape[1]
        text_rows = [range(max(lay.all_token_positions) + 1, T) for lay in inputs.layouts]
    logprobs = [g.token_logprobs if g.token_ids else (g.eos_logprob or 0.0,) for g in gens]
    feats = token_features(recorder, risk.layers, n, prompt_rows, logprobs if risk.use_confidence else None, text_rows)
    return [tuple(float(v) for v in risk.score(f)) for f in feats]
