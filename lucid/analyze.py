"""`lucid analyze`: how a checkpoint looks at images, as a report a researcher reads before choosing a
method's layers and heads.

Measured on a set of images (the testbed's held-out scenes, or any folder of images), through the real
generation path with one recorder per request:

* per layer and head, the share of attention on the image tokens, at prefill (the last prompt row, the
  one that predicts the first answer token) and during decoding (mean over the generated rows);
* per layer, the entropy of the head-mean image attention normalised by log N (1 = spread evenly);
* visual sink tokens after VAR (Kang et al., ICLR 2025): massive-activation channels D_sink of the
  hidden states (channels whose |x_d| / RMS(x) exceeds `tau` on some token in the middle layers; tau
  defaults to VAR's 20 scaled by sqrt(D / 4096), as the `var` method does), and
  per layer the share of image tokens whose sink score max_{d in D_sink} |x_d / RMS(x)| >= tau;
* the localization heads (`grounding.heads`) and, on the testbed, pointing accuracy per layer and
  head against ground truth.

Writes `report.md`, PNG plots and `analysis.json` into the output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from mitigation import AttentionRecorder  # noqa: E402
from vlm import VLM, SamplingParams, build_inputs, generate  # noqa: E402

DESCRIBE = "Describe the image."


@dataclass(frozen=True)
class AnalyzeConfig:
    question: str = DESCRIBE  # asked of every image; decoding rows are its answer's rows
    max_new_tokens: int = 24
    batch_size: int = 8
    tau: float | None = None  # VAR's sink threshold; None: 20 * sqrt(D / 4096), VAR's 20 on 7B (`var.default_tau`)
    sink_channels: int = 4  # at most this many massive-activation channels are reported


def _rms_ratio(h: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D] |x_d| / RMS(x) (RMS without the norm's learned weight, as VAR defines it)."""
    h = h.float()
    return h.abs() / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def collect_attention(vlm: VLM, images: list, cfg: AnalyzeConfig, show_progress: bool = True) -> dict:
    """Per layer/head image-attention shares, per-layer entropy, and sink statistics over `images`."""
    from mitigation.methods.var import default_tau

    L, H = vlm.n_layers, vlm.n_heads
    if cfg.tau is None:
        cfg = replace(cfg, tau=default_tau(vlm.model.config.text_config.hidden_size))
    pre_share = np.zeros((L, H))
    dec_share = np.zeros((L, H))
    entropy_pre = np.zeros(L)
    entropy_dec = np.zeros(L)
    max_ratio = None  # [L, D] max over tokens of |x_d| / RMS
    image_sink_counts = np.zeros(L)
    n_img_tokens = 0
    n = 0
    with Progress(disable=not show_progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("analyze: attention", total=len(images))
        for start in range(0, len(images), cfg.batch_size):
            chunk = images[start : start + cfg.batch_size]
            inputs = build_inputs(vlm, chunk, [cfg.question] * len(chunk))
            rec = AttentionRecorder(layers=None, prefill_rows="last", hidden_layers=range(L), hidden_rows="all")
            gens = generate(vlm, inputs, SamplingParams(max_new_tokens=cfg.max_new_tokens), recorder=rec)
            for layer in range(L):
                rows = rec.image_attention(layer).float()  # [B, H, S, N]
                share = rows.sum(-1)  # [B, H, S]
                for b, g in enumerate(gens):
                    k = max(1, len(g.token_ids))
                    pre_share[layer] += share[b, :, 0].numpy()
                    dec_share[layer] += share[b, :, 1:k].mean(-1).numpy() if k > 1 else share[b, :, 0].numpy()
                    m = rows[b].mean(0)[:k]  # [k, N] head mean
                    nimg = len(g.layout.token_positions)
                    p = m[:, :nimg] / m[:, :nimg].sum(-1, keepdim=True).clamp_min(1e-12)
                    ent = (-(p * p.clamp_min(1e-12).log()).sum(-1) / np.log(nimg)).numpy()
                    entropy_pre[layer] += ent[0]
                    entropy_dec[layer] += ent[1:].mean() if k > 1 else ent[0]
                hidden = rec.hidden_states(layer)  # [B, S, D], the prefill part first
                T = inputs.input_ids.shape[1]
                ratio = _rms_ratio(hidden[:, :T])  # [B, T, D]
                valid = inputs.attention_mask.bool()
                r = ratio.masked_fill(~valid[..., None], 0).amax((0, 1)).numpy()
                if max_ratio is None:
                    max_ratio = np.zeros((L, r.shape[0]))
                max_ratio[layer] = np.maximum(max_ratio[layer], r)
            # sink tokens among the image tokens, per layer, with the channels found so far
            dims = _sink_dims(max_ratio, cfg)
            for layer in range(L):
                hidden = rec.hidden_states(layer)
                ratio = _rms_ratio(hidden[:, : inputs.input_ids.shape[1]])
                for b, g in enumerate(gens):
                    pos = list(g.layout.token_positions)
                    if dims:
                        phi = ratio[b, pos][:, dims].amax(-1)
                        image_sink_counts[layer] += float((phi >= cfg.tau).sum())
            n_img_tokens += sum(len(g.layout.token_positions) for g in gens)
            n += len(chunk)
            bar.advance(task, len(chunk))
    dims = _sink_dims(max_ratio, cfg)
    return {
        "n_images": n,
        "question": cfg.question,
        "prefill_image_share": (pre_share / n).round(4).tolist(),
        "decode_image_share": (dec_share / n).round(4).tolist(),
        "prefill_entropy": (entropy_pre / n).round(4).tolist(),
        "decode_entropy": (entropy_dec / n).round(4).tolist(),
        "sink": {
            "tau": cfg.tau,
            "channels": dims,
            "max_ratio_per_layer": [round(float(v), 2) for v in max_ratio.max(1)],
            # share of image tokens that are sinks, per layer (by the hidden state entering the layer)
            "image_sink_share": (image_sink_counts / max(1, n_img_tokens)).round(5).tolist(),
        },
    }


def _sink_dims(max_ratio: np.ndarray | None, cfg: AnalyzeConfig) -> list[int]:
    """Massive-activation channels: over the middle layers (VAR reads layers 2..L-2), the channels whose
    largest |x_d| / RMS over tokens reaches tau, strongest first."""
    if max_ratio is None:
        return []
    L = max_ratio.shape[0]
    mid = max_ratio[min(2, L - 1) : max(min(2, L - 1) + 1, L - 1)].max(0)
    order = np.argsort(-mid)
    return [int(d) for d in order[: cfg.sink_channels] if mid[d] >= cfg.tau]


def _heat(ax, m: np.ndarray, title: str, cbar_label: str) -> None:
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    for (i, j), v in np.ndenumerate(m):
        if m.size <= 64:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    plt.colorbar(im, ax=ax, label=cbar_label)


def plot_shares(att: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    _heat(axes[0], np.array(att["prefill_image_share"]), "prefill (last prompt row)", "share on image tokens")
    _heat(axes[1], np.array(att["decode_image_share"]), "decoding (answer rows)", "share on image tokens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_entropy(att: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    L = len(att["prefill_entropy"])
    ax.plot(range(L), att["prefill_entropy"], "o-", label="prefill")
    ax.plot(range(L), att["decode_entropy"], "s-", label="decoding")
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy / log N")
    ax.set_ylim(0, 1.02)
    ax.set_title("spread of the image attention (1 = uniform)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pointing(table: np.ndarray, path: Path, chance: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    title = "pointing accuracy per head (peak cell on the object)"
    if chance is not None:
        title += f"\nchance {chance:.3f}"
    _heat(ax, table, title, "pointing accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_head_scores(selection, L: int, H: int, path: Path) -> Path:
    """Localization-head criteria per head: mean S_img and selection frequency, chosen heads boxed."""
    img = np.full((L, H), np.nan)
    freq = np.full((L, H), np.nan)
    for s in selection.scores:
        img[s.layer, s.head] = s.image_sum
        freq[s.layer, s.head] = s.frequency
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    _heat(axes[0], img, "criterion 1: attention sum on the image (S_img)", "mean S_img")
    _heat(axes[1], freq, "selection frequency (low spatial entropy)", "share of samples")
    for ax in axes:
        for layer, head in selection.heads:
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=2))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_analyze(
    vlm: VLM,
    out: str | Path,
    images: list | None = None,
    phrases=None,
    n: int = 60,
    seed: int = 777,
    cfg: AnalyzeConfig = AnalyzeConfig(),
    show_progress: bool = True,
) -> dict:
    """Write `report.md`, PNG plots and `analysis.json` into `out`.

    Args:
        images: images to analyse; None draws `n` held-out testbed scenes (and then also measures
            pointing accuracy per layer and head against the scenes' ground truth).
        phrases: a `grounding.CalibrationSet` for localization-head discovery on a real checkpoint; None
            uses the testbed's calibration scenes when analysing testbed scenes, and skips heads otherwise.
    """
    from grounding import calibration_from_testbed, load_or_discover

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    testbed = images is None
    if testbed:
        from testbed.world.scenes import WorldConfig, scenes

        images = [s.image for s in scenes(seed, n, WorldConfig())]
    att = collect_attention(vlm, images, cfg, show_progress)
    result: dict = {"model": vlm.name, "weights_hash": vlm.weights_hash(), "attention": att}
    pngs = {"shares": plot_shares(att, out / "image_share.png"), "entropy": plot_entropy(att, out / "entropy.png")}
    selection = None
    if phrases is not None or testbed:
        selection = load_or_discover(vlm, phrases if phrases is not None else calibration_from_testbed())
        result["localization_heads"] = selection.to_json()
        pngs["heads"] = plot_head_scores(selection, vlm.n_layers, vlm.n_heads, out / "localization_heads.png")
    if testbed and selection is not None:
        from testbed.studies.localization import eval_items, run_localization

        run = run_localization(vlm, eval_items(seed, n, 0), selection)
        table = run.head_table(run.rows)
        result["pointing"] = {
            "rows": run.rows,
            "template": run.template,
            "per_head": table.round(4).tolist(),
            "per_layer_head_mean": run.layer_baseline(run.rows).round(4).tolist(),
            "locate": run.score(),
        }
        pngs["pointing"] = plot_pointing(table, out / "pointing.png")
    (out / "analysis.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "report.md").write_text(_report(result, {k: p.name for k, p in pngs.items()}))
    return result


def _report(r: dict, pngs: dict[str, str]) -> str:
    att = r["attention"]
    pre = np.array(att["prefill_image_share"])
    dec = np.array(att["decode_image_share"])
    lines = [
        f"# How `{r['model']}` looks at images",
        "",
        f'{att["n_images"]} images, question "{att["question"]}", greedy. Weights sha256 `{r["weights_hash"][:16]}`.',
        "",
        "## Attention on the image tokens",
        "",
        f"![image share]({pngs['shares']})",
        "",
        "| layer | prefill share (head mean) | decoding share | prefill entropy / log N | decoding entropy / log N |",
        "|---|---|---|---|---|",
    ]
    for layer in range(pre.shape[0]):
        lines.append(
            f"| {layer} | {pre[layer].mean():.3f} | {dec[layer].mean():.3f} | "
            f"{att['prefill_entropy'][layer]:.3f} | {att['decode_entropy'][layer]:.3f} |"
        )
    best = np.unravel_index(np.argmax(dec), dec.shape)
    lines += [
        "",
        f"Most image-attentive head while decoding: layer {best[0]} head {best[1]} ({dec[best]:.3f} of its attention).",
        "",
        f"![entropy]({pngs['entropy']})",
        "",
        "## Visual sink tokens (VAR's definition)",
        "",
    ]
    sink = att["sink"]
    if sink["channels"]:
        lines.append(
            f"Massive-activation channels (|x_d| / RMS(x) >= {sink['tau']} in the middle layers): {sink['channels']}. "
            f"Share of image tokens that are sinks, per layer: {sink['image_sink_share']}."
        )
    else:
        lines.append(
            f"No channel reaches |x_d| / RMS(x) >= {sink['tau']} in the middle layers (largest per layer: "
            f"{sink['max_ratio_per_layer']}): this backbone has no massive activations, so VAR finds no sinks here."
        )
    if "localization_heads" in r:
        lh = r["localization_heads"]
        heads = ", ".join(f"L{layer}:H{head}" for layer, head in lh["heads"])
        lines += [
            "",
            "## Localization heads",
            "",
            f"Chosen: {heads} (calibration `{lh['calibration']}`, {lh['n_samples']} samples).",
            "",
            f"![heads]({pngs['heads']})",
        ]
    if "pointing" in r:
        p = r["pointing"]
        table = np.array(p["per_head"])
        bl, bh = np.unravel_index(np.argmax(table), table.shape)
        loc = p["locate"].get("heldout", {})
        lines += [
            "",
            "## Pointing against ground truth (testbed)",
            "",
            f'Rows "{p["rows"]}" of the prompt "{p["template"]}". Best single head: L{bl}:H{bh} '
            f"({table[bl, bh]:.3f}); head mean per layer: {[round(v, 3) for v in p['per_layer_head_mean']]}. "
            f"`lucid locate` with the chosen heads: pointing {loc.get('pointing')}, "
            f"box accuracy {loc.get('box_accuracy')}.",
            "",
            f"![pointing]({pngs['pointing']})",
        ]
    return "\n".join(lines) + "\n"
