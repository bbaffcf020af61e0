"""Localization heads: the few (layer, head) pairs whose text-to-image attention finds the referred object.

Training-free discovery after Kang et al. (CVPR 2025, arXiv 2503.06287). Per calibration sample, one
prefill records every head's attention of the chosen text rows over the image tokens. Criterion 1: the
head's attention mass on the image (S_img) must lie above the elbow of that sample's sorted S_img curve
(heads that barely look at the image are out). Criterion 2: among those, the heads whose map is
spatially concentrated (lowest spatial entropy) are this sample's picks. Counting picks over the
calibration set, the most frequently picked heads are the localization heads. Selections are cached
per weights hash (`LUCID_CACHE`, default ~/.cache/lucid) and can always be overridden by explicit heads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from grounding.calibration import TESTBED_SCENES, TESTBED_SEED, CalibrationSet, calibration_from_testbed
from grounding.maps import connected_components
from grounding.readout import ROWS, iter_attention, render_prompt
from vlm import VLM
from vlm.checkpoint import cache_root
from vlm.checkpoint import weights_hash as checkpoint_hash

log = logging.getLogger(__name__)

ELBOWS = ("chord", "mean", "none")
Head = tuple[int, int]

#: The paper's prompt: the referring expression itself is the user's text.
PAPER_PROMPT = "{query}"


@dataclass(frozen=True)
class HeadParams:
    """The named choices of head discovery.

    Attributes:
        prompt: how a phrase becomes the user's text ("{query}": the phrase itself, the paper's input;
            "Where is {query}?"; "Is there a {noun} in the image?"; see `readout.render_prompt`).
        rows: whose attention is read: "last" the last prompt row (the paper's last input token, the row
            that predicts the answer) or "query" the phrase's own rows, averaged.
        elbow: criterion-1 threshold on a sample's S_img values over all heads: "chord" the point of the
            sorted curve farthest from the chord joining its ends (Kneedle-style elbow; heads strictly
            above it pass), "mean" above the mean, "none" every head passes.
        top_k_per_sample: heads picked per sample (lowest spatial entropy among criterion-1 survivors);
            None scales the paper's 10 of LLaVA-1.5-7B's 1024 heads: min(10, max(n_heads, round(1% of
            all heads))), i.e. 3 on the 24-head testbed model, 10 on a 7B.
        n_heads: localization heads kept (the paper combines 3).
        connectivity: 8 or 4, neighbourhood of the connected components in the spatial entropy.
        min_layer: layers below it are never candidates (0: all layers).
    """

    prompt: str = PAPER_PROMPT
    rows: str = "last"
    elbow: str = "chord"
    top_k_per_sample: int | None = None
    n_heads: int = 3
    connectivity: int = 8
    min_layer: int = 0

    def __post_init__(self) -> None:
        render_prompt(self.prompt, "the object")  # validates the placeholder
        if self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {self.rows!r}")
        if self.elbow not in ELBOWS:
            raise ValueError(f"elbow must be one of {ELBOWS}, got {self.elbow!r}")
        if self.top_k_per_sample is not None and self.top_k_per_sample < 1:
            raise ValueError(f"top_k_per_sample must be >= 1 or None, got {self.top_k_per_sample}")
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")

    def per_sample_k(self, n_layers: int, n_heads: int) -> int:
        if self.top_k_per_sample is not None:
            return self.top_k_per_sample
        return min(10, max(self.n_heads, round(0.01 * n_layers * n_heads)))


#: Discovery choices for models of the testbed world, chosen by pointing on the calibration scenes' own
#: ground truth (`python -m testbed.studies.localization`, split "calibration"); the held-out splits only report.
TESTBED_PARAMS = HeadParams(prompt="{query}", rows="query")


@dataclass(frozen=True)
class HeadScore:
    """Calibration statistics of one head.

    Attributes:
        image_sum: mean S_img, the head's attention mass on the image tokens.
        entropy: mean spatial entropy (nats) over the samples where the head passed criterion 1 (NaN if
            it never did: entropy is only computed for candidates).
        passed: share of samples where the head passed criterion 1.
        frequency: share of samples where the head was among that sample's picks.
    """

    layer: int
    head: int
    image_sum: float
    entropy: float
    passed: float
    frequency: float


@dataclass(frozen=True)
class HeadSelection:
    """Localization heads of one checkpoint and how they were found.

    Attributes:
        heads: (layer, head) pairs, best first.
        params: the discovery parameters (prompt template and text rows included).
        scores: one `HeadScore` per head of the model, layer-major (empty for explicit heads).
        weights_hash: sha256 of the checkpoint's weight files.
        calibration: name of the calibration set ("explicit" when the heads were given).
        n_samples: calibration samples used.
    """

    heads: tuple[Head, ...]
    params: HeadParams
    weights_hash: str
    calibration: str
    n_samples: int
    scores: tuple[HeadScore, ...] = field(default=(), repr=False)

    def to_json(self) -> dict:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "heads": [list(h) for h in self.heads],
            "params": asdict(self.params),
            "weights_hash": self.weights_hash,
            "calibration": self.calibration,
            "n_samples": self.n_samples,
            "scores": [
                {
                    "layer": s.layer,
                    "head": s.head,
                    "image_sum": num(s.image_sum),
                    "entropy": num(s.entropy),
                    "passed": num(s.passed),
                    "frequency": num(s.frequency),
                }
                for s in self.scores
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> HeadSelection:
        def num(x: float | None) -> float:
            return float("nan") if x is None else float(x)

        return cls(
            heads=tuple((int(a), int(b)) for a, b in data["heads"]),
            params=HeadParams(**data["params"]),
            weights_hash=str(data["weights_hash"]),
            calibration=str(data["calibration"]),
            n_samples=int(data["n_samples"]),
            scores=tuple(
                HeadScore(
                    int(s["layer"]),
                    int(s["head"]),
                    num(s["image_sum"]),
                    num(s["entropy"]),
                    num(s["passed"]),
                    num(s["frequency"]),
                )
                for s in data.get("scores", [])
            ),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadSelection:
        return cls.from_json(json.loads(Path(path).read_text()))


def spatial_entropy(values: np.ndarray, connectivity: int = 8) -> float:
    """Spatial entropy of a [rows, cols] attention map, in nats (lower: more concentrated).

    The map is binarized at its mean (cells strictly above it), the binary map is split into connected
    components, and the entropy is taken over the components' shares of the binarized cells:
    H = -sum_i p_i ln p_i with p_i = |C_i| / sum_j |C_j|. One blob gives 0, two equal blobs ln 2.
    A map with no cell above its mean (a constant map) has no component: +inf.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"map must be [rows, cols], got shape {v.shape}")
    labels, n = connected_components(v > v.mean(), connectivity)
    if n == 0:
        return float("inf")
    sizes = np.bincount(labels.ravel())[1:].astype(np.float64)
    p = sizes / sizes.sum()
    return float(-(p * np.log(p)).sum() + 0.0)


def elbow_threshold(values: Sequence[float] | np.ndarray, method: str = "chord") -> float:
    """Criterion-1 threshold over one sample's per-head S_img values; heads strictly above it pass.

    "chord": sort ascending, normalise both axes to [0, 1], and return the value at the point farthest
    from the straight line joining the first and last points (for the usual curve, many heads near 0 and
    a few high, that is the last point of the flat part). "mean": the mean. "none": -inf.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if method == "none":
        return float("-inf")
    if method == "mean":
        return float(v.mean())
    if method != "chord":
        raise ValueError(f"elbow must be one of {ELBOWS}, got {method!r}")
    if v.size < 3 or v[-1] == v[0]:
        return float(v[0]) if v.size else float("-inf")
    x = np.linspace(0.0, 1.0, v.size)
    y = (v - v[0]) / (v[-1] - v[0])
    return float(v[int(np.argmax(np.abs(y - x)))])  # |distance| to the chord y = x, up to a constant


def sample_picks(
    maps: np.ndarray,
    image_sum: np.ndarray,
    layers: Sequence[int],
    grid: tuple[int, int],
    params: HeadParams,
    k: int,
) -> tuple[list[Head], np.ndarray, np.ndarray]:
    """Criterion 1 + 2 on one sample.

    Args:
        maps: [L', H, N] image attention of the chosen rows; image_sum: [L', H] S_img.
        layers: the decoder layer of each index of dim 0.

    Returns:
        (picks, passed [L', H] bool, entropy [L', H] with NaN where not a candidate).
    """
    thr = elbow_threshold(image_sum, params.elbow)
    layer_ok = np.array([layer >= params.min_layer for layer in layers])[:, None]
    passed = (image_sum > thr) & layer_ok
    entropy = np.full(image_sum.shape, np.nan)
    cands = []
    for i, h in zip(*np.nonzero(passed)):
        entropy[i, h] = spatial_entropy(maps[i, h].reshape(grid), params.connectivity)
        cands.append((entropy[i, h], -float(image_sum[i, h]), layers[i], int(h)))
    cands.sort()
    return [(layer, h) for _, _, layer, h in cands[:k]], passed, entropy


def discover_heads(
    vlm: VLM,
    samples: CalibrationSet,
    params: HeadParams = HeadParams(),
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
) -> HeadSelection:
    """Find the localization heads of `vlm` on a calibration set (training-free, deterministic).

    One prefill per batch of `batch_size` samples records every layer and head (`AttentionRecorder(
    layers=None, prefill_rows=<last + phrase positions>, reduce_heads=None)`); each sample is reduced to
    its picks at once, so memory does not grow with the calibration set.
    """
    L, H = vlm.n_layers, vlm.n_heads
    k = params.per_sample_k(L, H)
    picks = np.zeros((L, H))
    passed = np.zeros((L, H))
    sums = np.zeros((L, H))
    ent_sum = np.zeros((L, H))
    ent_n = np.zeros((L, H))
    images = [s.image for s in samples.samples]
    phrases = [s.phrase for s in samples.samples]
    n = 0
    for qa in iter_attention(vlm, images, phrases, params.prompt, layers=None, batch_size=batch_size):
        layers = list(qa.layers)
        image_sum = qa.image_sum[params.rows]
        chosen, ok, ent = sample_picks(qa.maps(params.rows), image_sum, layers, qa.layout.grid, params, k)
        for layer, h in chosen:
            picks[layer, h] += 1
        idx = np.array(layers)
        passed[idx] += ok
        sums[idx] += image_sum
        finite = np.isfinite(ent)
        ent_sum[idx] += np.where(finite, ent, 0.0)
        ent_n[idx] += finite
        n += 1
    freq, mean_sum = picks / n, sums / n
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ent = np.where(ent_n > 0, ent_sum / np.maximum(ent_n, 1), np.nan)
    scores = tuple(
        HeadScore(
            layer,
            h,
            float(mean_sum[layer, h]),
            float(mean_ent[layer, h]),
            float(passed[layer, h] / n),
            float(freq[layer, h]),
        )
        for layer in range(L)
        for h in range(H)
    )
    ranked = sorted(
        scores,
        key=lambda s: (
            -s.frequency,
            s.entropy if not math.isnan(s.entropy) else math.inf,
            -s.image_sum,
            s.layer,
            s.head,
        ),
    )
    heads = tuple((s.layer, s.head) for s in ranked[: params.n_heads])
    log.info("localization heads of %s: %s (calibration %s, %d samples)", vlm.name, heads, samples.name, n)
    return HeadSelection(heads, params, weights_hash(vlm, cache_dir), samples.name, n, scores)


def explicit_selection(
    vlm: VLM, heads: Sequence[Head], params: HeadParams = HeadParams(), cache_dir: str | os.PathLike | None = None
) -> HeadSelection:
    """A selection from given heads (no discovery), checked against the model's layers and heads.

    Raises:
        ValueError: no heads, or a head outside the model.
    """
    heads = tuple((int(a), int(b)) for a, b in heads)
    if not heads:
        raise ValueError("explicit heads must name at least one (layer, head)")
    for layer, h in heads:
        if not (0 <= layer < vlm.n_layers and 0 <= h < vlm.n_heads):
            raise ValueError(f"head ({layer}, {h}) is outside the model ({vlm.n_layers} layers x {vlm.n_heads} heads)")
    return HeadSelection(heads, params, weights_hash(vlm, cache_dir), "explicit", 0)


def parse_heads(text: str) -> tuple[Head, ...]:
    """'14:24,14:13' -> ((14, 24), (14, 13)).

    Raises:
        ValueError: not a comma-separated list of LAYER:HEAD integers.
    """
    out = []
    for part in text.split(","):
        try:
            a, b = part.strip().split(":")
            out.append((int(a), int(b)))
        except ValueError:
            raise ValueError(f"heads must look like 'L:H,L:H' (e.g. '14:24,14:13'), got {text!r}") from None
    return tuple(out)


#: A selection shipped beside a checkpoint's weights (the embedded model has one): used by `load_or_discover`
#: when its weights hash, parameters and calibration set are the ones asked for, so nothing is rediscovered.
SHIPPED_FILE = "lucid_heads.json"


def weights_hash(vlm: VLM, cache_dir: str | os.PathLike | None = None) -> str:
    """The loaded checkpoint's identity (`vlm.checkpoint.weights_hash`)."""
    return checkpoint_hash(vlm.path, cache_dir)


def cache_path(digest: str, params: HeadParams, calibration: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the selection for (weights, params, calibration set) is cached."""
    key = hashlib.sha256(json.dumps([digest, asdict(params), calibration], sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "heads" / f"{digest[:16]}-{key[:16]}.json"


def default_params(samples: CalibrationSet | None = None) -> HeadParams:
    """`TESTBED_PARAMS` for the testbed world's calibration (None, or a set named "testbed:..."), whose
    models were trained on the testbed's questions; the paper's `HeadParams()` for any other set."""
    if samples is None or samples.name.startswith("testbed:"):
        return TESTBED_PARAMS
    return HeadParams()


def load_or_discover(
    vlm: VLM,
    samples: CalibrationSet | None = None,
    params: HeadParams | None = None,
    heads: Sequence[Head] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> HeadSelection:
    """The localization heads of `vlm`: explicit `heads` if given, else the cached selection for
    (weights hash, params, calibration set), else a fresh discovery written to the cache.

    Args:
        samples: calibration set; None is the testbed world's (`calibration_from_testbed()`), which suits the
            embedded models; pass `calibration_from_folder(...)` for a real checkpoint.
        params: discovery choices; None: `default_params(samples)`.
        heads: explicit (layer, head) pairs: no discovery, nothing cached.
        cache_dir: overrides `LUCID_CACHE` (also for the remembered weights hash).
    """
    params = params if params is not None else default_params(samples)
    if heads is not None:
        return explicit_selection(vlm, heads, params, cache_dir)
    digest = weights_hash(vlm, cache_dir)
    name = samples.name if samples is not None else default_calibration_name()
    path = cache_path(digest, params, name, cache_dir)
    if path.is_file():
        return HeadSelection.load(path)
    shipped = Path(vlm.path) / SHIPPED_FILE
    if shipped.is_file():  # a selection shipped beside the weights: used only if it is for exactly this request
        selection = HeadSelection.load(shipped)
        if (selection.weights_hash, selection.params, selection.calibration) == (digest, params, name):
            selection.save(path)
            return selection
    selection = discover_heads(
        vlm, samples if samples is not None else calibration_from_testbed(), params, batch_size, cache_dir
    )
    selection.save(path)
    log.info("cached localization heads at %s", path)
    return selection


def default_calibration_name() -> str:
    """Name of `calibration_from_testbed()` with its defaults (without rendering its scenes)."""
    return f"testbed:seed={TESTBED_SEED}:scenes={TESTBED_SCENES}"
