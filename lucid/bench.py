"""`lucid bench`: prefill latency, per-token decode latency and peak memory, side by side in one run.

Paths compared on the same inputs, greedy, a fixed number of decode steps:

* `sdpa`: the model loaded with plain sdpa attention (no Lucid at all);
* `lucid-idle`: Lucid's seam ("lucid" attention) with an empty plan in scope;
* `lucid-record`: the seam recording image-attention rows of every layer, every step;
* `lucid-risk`: what the hallucination-risk score (`mitigation.risk`) records: every layer's head-mean
  image-attention rows, all prompt rows at prefill, then every step (the features are computed once after
  the answer, outside the per-token timings);
* `eager+attn`: the way the official method repos run: eager attention, `output_attentions=True`,
  every step's full attention matrices kept (as `generate(output_attentions=True)` returns them).

Each (model, path) runs in its own subprocess so peak memory is that path's alone (CUDA: peak
allocated above what was allocated before the timed runs; CPU: peak RSS sampled every millisecond
during one extra, untimed run, above the RSS before it; both after a warm-up run).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PATHS = ("sdpa", "lucid-idle", "lucid-record", "lucid-risk", "eager+attn")


@dataclass(frozen=True)
class BenchModel:
    name: str
    steps: int
    reps: int
    layers: int | None = None  # for the LLaVA-1.5-shaped model


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssPeak:
    """Peak resident memory while the block runs, sampled every millisecond by a thread (CPU has no
    allocator statistics; torch ops release the GIL, so the sampler keeps running)."""

    def __enter__(self):
        self.base = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _llava15_shaped(layers: int, device, dtype):
    """LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336 tower, 576 image tokens, Llama hidden 4096 x 32 heads,
    MLP 11008, vocab 32064) with reduced depth and random weights."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import mitigation

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=min(layers, 2),
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        ),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    from transformers.initialization import no_init_weights

    with no_init_weights():  # buffers (positions, rotary) are built; weights are filled below
        model = LlavaForConditionalGeneration(cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model = model.to(device, dtype)
    _set_attention(model, mitigation.ATTN_IMPLEMENTATION)
    model.eval()
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 576), 32000), torch.randint(100, 30000, (1, 24))], 1)
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=gen).to(device, dtype),
    }
    return model, inputs, 32000


def _set_attention(model, name: str) -> None:
    model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})


def _worker(model_name: str, path: str, steps: int, reps: int, layers: int | None, device: str | None) -> dict:
    import torch
    from transformers import DynamicCache

    import mitigation
    from vlm import build_inputs, load_vlm
    from vlm.loader import default_device_dtype

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dev, dtype = default_device_dtype(device, None)
    if model_name == "testbed":
        from testbed.world import render_scene

        vlm = load_vlm("testbed", device=dev)
        model = vlm.model
        batch = build_inputs(vlm, [render_scene(0).image], ["Describe the image."])
        inputs, image_token = batch.model_kwargs(), vlm.image_token_id
    else:
        model, inputs, image_token = _llava15_shaped(layers, dev, dtype)
    if path == "sdpa":
        _set_attention(model, "sdpa")
    elif path == "eager+attn":
        _set_attention(model, "eager")
    n_layers = model.config.text_config.num_hidden_layers
    n_heads = model.config.text_config.num_attention_heads

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def once():
        mask = inputs["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        kept = []  # eager+attn keeps every step's attentions, as generate(output_attentions=True) does
        recorder = None
        if path == "lucid-record":
            recorder = mitigation.AttentionRecorder(layers=None)
        elif path == "lucid-risk":
            recorder = mitigation.AttentionRecorder(layers=None, prefill_rows="all", reduce_heads="mean")
        ctx = mitigation.scope(
            mitigation.Plan(),
            recorder,
            image_mask=inputs["input_ids"] == image_token,
            n_heads=n_heads,
            n_layers=n_layers,
        )
        extra = {"output_attentions": True} if path == "eager+attn" else {}
        decode = []
        with torch.inference_mode(), ctx:
            sync()
            t0 = time.perf_counter()
            out = model(**inputs, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            prefill = time.perf_counter() - t0
            if extra:
                kept.append(out.attentions)
            for _ in range(steps):
                t = time.perf_counter()
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
                pos = pos[:, -1:] + 1
                out = model(
                    input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, **extra
                )
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                if extra:
                    kept.append(out.attentions)
                sync()
                decode.append(time.perf_counter() - t)
        return prefill, decode

    once()  # warm-up (allocator, lazy inits)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    prefills, decodes = [], []
    for _ in range(reps):
        p, d = once()
        prefills.append(p)
        decodes.extend(d)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_mem
    else:
        with _RssPeak() as rss:  # one more, untimed run: the sampler thread would perturb timings
            once()
        peak = rss.peak - rss.base
    return {
        "model": model_name,
        "path": path,
        "prefill_ms": statistics.median(prefills) * 1e3,
        "decode_ms": statistics.median(decodes) * 1e3,
        "peak_mib": max(0.0, peak),
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _run_worker(spec: BenchModel, path: str, device: str | None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lucid.bench",
        "--worker",
        spec.name,
        path,
        str(spec.steps),
        str(spec.reps),
        str(spec.layers or 0),
        device or "",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec.name}/{path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"CPU {cpu} ({os.cpu_count()} cores, torch threads 2), GPU {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def bench_specs(quick: bool = False) -> list[BenchModel]:
    """What a run measures: the testbed model (32 decode steps x 5 reps), then the LLaVA-1.5-shaped model
    (2 text layers, 8 steps x 2 reps); `quick`: the testbed model only, 8 steps x 1 rep (a CI smoke run)."""
    specs = [BenchModel("testbed", steps=8 if quick else 32, reps=1 if quick else 5)]
    if not quick:
        specs.append(BenchModel("llava15-shaped", steps=8, reps=2, layers=2))
    return specs


def run_bench(out: str | Path | None, quick: bool = False, device: str | None = None) -> list[dict]:
    """Run every (model, path) of `bench_specs(quick)`, each in its own process, and write the Markdown table
    to `out` (None: write nothing; `render_markdown` gives the text). Progress goes to stderr."""
    from rich.console import Console
    from rich.progress import track

    from vlm.contract import write_output

    specs = bench_specs(quick)
    jobs = [(s, p) for s in specs for p in PATHS]
    progress = track(jobs, description="bench", console=Console(stderr=True))
    rows = [_run_worker(s, p, device) for s, p in progress]
    if out is not None:
        write_output(out, render_markdown(rows, specs, quick))
    return rows


def render_markdown(rows: list[dict], specs: list[BenchModel], quick: bool) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {_machine()}.",
        "",
        "Written by `lucid bench`" + (" --quick" if quick else "") + "; every row of a table was measured in the "
        "same run, each path in its own process. Latencies are medians; ratios are against `sdpa`. "
        "Peak MiB: memory a run needed above what was resident before it, after a warm-up (CUDA: peak "
        "allocated over the timed runs; CPU: peak RSS sampled every ms in one extra untimed run, so "
        "allocator reuse makes small numbers noisy).",
        "",
    ]
    for spec in specs:
        mine = [r for r in rows if r["model"] == spec.name]
        base = next(r for r in mine if r["path"] == "sdpa")
        title = spec.name if spec.layers is None else f"{spec.name} ({spec.layers} text layers, random weights)"
        lines += [
            f"## {title}: prefill + {spec.steps} decode steps x {spec.reps} reps, {base['device']} {base['dtype']}",
            "",
            "| path | prefill ms | x sdpa | decode ms/token | x sdpa | peak MiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in mine:
            lines.append(
                f"| {r['path']} | {r['prefill_ms']:.1f} | {r['prefill_ms'] / base['prefill_ms']:.2f} | "
                f"{r['decode_ms']:.2f} | {r['decode_ms'] / base['decode_ms']:.2f} | {r['peak_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, path, steps, reps, layers, device = sys.argv[2:8]
        result = _worker(name, path, int(steps), int(reps), int(layers) or None, device or None)
        print(json.dumps(result))
