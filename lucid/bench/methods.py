"""`lucid bench`: prefill latency, per-token decode latency and peak memory, side by side in one run.

Paths compared on the same inputs, greedy, a fixed number of decode steps (EOS ignored):

* `sdpa`: the model with plain sdpa attention (Lucid's generate loop, no Lucid attention at all);
* `lucid-idle`: Lucid's seam ("lucid" attention) with an empty plan in scope;
* `lucid-record`: the seam recording image-attention rows of every layer, every step;
* `lucid-risk`: what the hallucination-risk score records (every layer's head-mean rows, all prompt rows at
  prefill, then every step);
* `method:NAME`: each registered method at its defaults (PAI also without its guidance stream, the
  single-pass part), and one composition, through `generate`; the
  methods' preparatory work (VHR's image-free stream, PAI's guidance stream, the fix's vision-tower pass)
  counts in their prefill;
* `method:dyvte`, `method:dyvte:rule=attention`: DyVTE's routers (its default) and its calibrated attention rule
  (a model without a calibration reports why it did not run);
* `method:dyvte:layer=half`: DyVTE's static exit after the middle decoder layer; its row also gives the
  prefill decoder FLOPs the exit saved (counted from the shapes run) beside the prefill time it saved;
* `eager+attn`: the way the official method repos run: eager attention, `output_attentions=True`, every
  step's full attention matrices kept (a bare prefill + decode loop, no Lucid: if anything this favours it).

**Timing**: one process per model; in each round every path runs once, in a seeded shuffled order, so a
machine that slows down or speeds up affects every path alike. Per round and path: the prefill time and the
median per-token decode time; per round the ratio to `sdpa` (paired); reported: the median over rounds and
a 95 % bootstrap interval of the median ratio. **Memory**: CUDA: peak allocated above what was allocated
before, per path in the timing process; CPU: each path once more in its own process, peak RSS sampled every
millisecond above the RSS before the run (CPU allocators keep freed memory, so only a fresh process tells).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lucid.bench.stats import bootstrap_median

BASE_PATHS = ("sdpa", "lucid-idle", "lucid-record", "lucid-risk", "eager+attn")
#: method paths -> the registry specs they run ("+" composes)
METHOD_SPECS = {
    "method:pai": "pai",
    "method:pai:gamma=1": "pai:gamma=1",
    "method:paint": "paint",
    "method:vhr": "vhr",
    "method:var": "var",
    "method:vhr+pai": "vhr:scale_free_stream=false+pai",
    "method:vcd": "vcd",
    "method:vcd+vhr": "vcd+vhr",
    "method:carve:first": "carve:cache=false",  # a first question about an image: both capture passes
    "method:carve": "carve",  # a repeated image: the general pass's rows come from the cache
    "method:carve:steps=first": "carve:steps=first,cache=false",  # the first-step variant: prefill to layer 25
    "method:carve+vhr": "carve+vhr",
    "method:magnifier": "magnifier",
    "method:magnifier:tokens=image": "magnifier:tokens=image",
    "method:dyvte": "dyvte",  # the routers (testbed: a description, which they do not let exit: their overhead)
    "method:dyvte:rule=attention": "dyvte:rule=attention",  # the calibrated attention-mass rule
    # DyVTE's static rule with the image tokens leaving after the middle layer ({half} = layers // 2 - 1):
    # the second half of the decoder runs without them (the paper's LLaVA-1.5 exit sits about there)
    "method:dyvte:layer=half": "dyvte:layer={half}",
}
PATHS = BASE_PATHS + tuple(METHOD_SPECS)


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


def _bench_vlm(model_name: str, layers: int | None, dev, dtype):
    """(VLM, inputs) for a bench model: the embedded testbed model, or the LLaVA-1.5-shaped one wrapped in a
    `VLM` with the testbed's tokenizer and a 336-px / patch-14 image processor (576 image tokens)."""
    import mitigation
    from testbed.world.scenes import render_scene
    from vlm import build_inputs, load_vlm
    from vlm.loader import VLM

    image = render_scene(0).image
    if model_name == "testbed":
        vlm = load_vlm("testbed", device=dev)
    else:
        from transformers import AutoProcessor

        from vlm.checkpoint import TESTBED_DIR

        model, _, _ = _llava15_shaped(layers, dev, dtype)
        processor = AutoProcessor.from_pretrained(TESTBED_DIR)
        processor.image_processor.size = {"shortest_edge": 336}
        processor.image_processor.crop_size = {"height": 336, "width": 336}
        processor.patch_size = 14
        model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        mitigation.install_hidden_capture(model.model.language_model)
        path = Path(tempfile.mkdtemp(prefix="lucid-bench-"))  # no weight files: caches key on nothing shared
        vlm = VLM(model=model, processor=processor, source=model_name, path=path, kind="llava", device=dev, dtype=dtype)
    inputs = build_inputs(vlm, [image], ["Describe the image."])
    return vlm, inputs


def _method_spec(vlm, path: str) -> str:
    """The registry spec a method path runs on `vlm` (`{half}`: the middle decoder layer)."""
    return METHOD_SPECS[path].format(half=vlm.model.config.text_config.num_hidden_layers // 2 - 1)


def _run_path(vlm, inputs, path: str, steps: int) -> tuple[float, list[float]]:
    """One prefill + `steps` decode steps on `path`: (prefill seconds, per-step decode seconds)."""
    prefill, decode, _ = _run_path_records(vlm, inputs, path, steps)
    return prefill, decode


def _run_path_records(vlm, inputs, path: str, steps: int) -> tuple[float, list[float], dict]:
    """`_run_path` and the methods' records of the row (`Generation.extra_records()`; {} off the methods)."""
    import torch
    from transformers import DynamicCache

    import mitigation
    from mitigation.methods import parse_methods
    from vlm import SamplingParams, generate
    from vlm.decoding import cache_argument

    model = vlm.model
    if path == "eager+attn":
        _set_attention(model, "eager")
        kw = inputs.model_kwargs()
        mask = kw["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        ckw = cache_argument(model)
        kept, decode = [], []
        with torch.inference_mode():
            _sync(vlm.device)
            t0 = time.perf_counter()
            out = model(**kw, position_ids=pos, **{ckw: cache}, use_cache=True, logits_to_keep=1,
                        output_attentions=True)  # fmt: skip
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            kept.append(out.attentions)
            _sync(vlm.device)
            prefill = time.perf_counter() - t0
            for _ in range(steps - 1):
                t = time.perf_counter()
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **{ckw: cache},
                            use_cache=True, output_attentions=True)  # fmt: skip
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                kept.append(out.attentions)
                _sync(vlm.device)
                decode.append(time.perf_counter() - t)
        return prefill, decode, {}
    _set_attention(model, "sdpa" if path == "sdpa" else mitigation.ATTN_IMPLEMENTATION)
    recorder, methods = None, ()
    if path == "lucid-record":
        recorder = mitigation.AttentionRecorder(layers=None)
    elif path == "lucid-risk":
        recorder = mitigation.AttentionRecorder(layers=None, prefill_rows="all", reduce_heads="mean")
    elif path in METHOD_SPECS:
        methods = parse_methods(_method_spec(vlm, path).split("+"))
    gen = generate(vlm, inputs, SamplingParams(max_new_tokens=steps, ignore_eos=True), recorder=recorder,
                   methods=methods)[0]  # fmt: skip
    t = gen.timings
    return t.prepare_s + t.prefill_s, list(t.decode_s), gen.extra_records()


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def check_paths(paths: list[str] | None) -> tuple[str, ...]:
    """The paths a run times: all (None), or `sdpa` (every ratio's reference) and the named ones in PATHS'
    order; an unknown name is a ValueError listing the valid ones."""
    if not paths:
        return PATHS
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise ValueError(f"unknown bench path {', '.join(bad)}; valid: {', '.join(PATHS)}")
    return tuple(p for p in PATHS if p == "sdpa" or p in paths)


def _timing_worker(model_name: str, steps: int, rounds: int, layers: int | None, device: str | None,
                   paths: tuple[str, ...] = PATHS) -> dict:  # fmt: skip
    """Every path, interleaved over `rounds` (see the module doc); raw per-round numbers."""
    import numpy as np
    import torch

    from vlm.loader import default_device_dtype

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dev, dtype = default_device_dtype(device, None)
    vlm, inputs = _bench_vlm(model_name, layers, dev, dtype)
    errors: dict[str, str] = {}
    flops_saved: dict[str, float] = {}  # paths whose method counts the prefill FLOPs it saved (dyvte)
    for path in paths:  # warm-up, and find the paths that cannot run here (reported, not dropped silently)
        try:
            _, _, records = _run_path_records(vlm, inputs, path, 2)
            if "flops_saved" in records.get("dyvte", {}):
                flops_saved[path] = records["dyvte"]["flops_saved"]
        except Exception as e:  # noqa: BLE001 - a bench row says why it is missing
            errors[path] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    ran = [p for p in paths if p not in errors]
    prefill = {p: [] for p in ran}
    decode = {p: [] for p in ran}
    peak = {p: 0.0 for p in ran}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for i in rng.permutation(len(ran)):
            p = ran[i]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            pf, dc = _run_path(vlm, inputs, p, steps)
            if dev.type == "cuda":
                peak[p] = max(peak[p], (torch.cuda.max_memory_allocated() - base) / 2**20)
            prefill[p].append(pf)
            decode[p].append(statistics.median(dc))
    return {"model": model_name, "steps": steps, "paths": list(paths), "prefill": prefill, "decode": decode,
            "peak_mib": peak if dev.type == "cuda" else {}, "errors": errors, "device": str(dev),
            "flops_saved": flops_saved,
            "dtype": str(dtype).replace("torch.", ""),
            "image_tokens": int((inputs.input_ids == vlm.image_token_id).sum())}  # fmt: skip


def _memory_worker(model_name: str, path: str, steps: int, layers: int | None, device: str | None) -> float:
    """Peak RSS (MiB) of one run of `path` above the RSS before it, in a fresh process, after a warm-up."""
    import torch

    from vlm.loader import default_device_dtype

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dev, dtype = default_device_dtype(device, None)
    vlm, inputs = _bench_vlm(model_name, layers, dev, dtype)
    _run_path(vlm, inputs, path, 2)
    with _RssPeak() as rss:
        _run_path(vlm, inputs, path, steps)
    return max(0.0, rss.peak - rss.base)


def _subprocess(args: list[str], device: str | None) -> dict | float:
    cmd = [sys.executable, "-m", "lucid.bench.methods", *args, device or ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(raw: dict, memory: dict[str, float]) -> list[dict]:
    """Rows per path: medians and paired ratios to sdpa with intervals."""
    rows = []
    for p in raw.get("paths", PATHS):
        if p in raw["errors"]:
            rows.append({"model": raw["model"], "path": p, "error": raw["errors"][p]})
            continue
        pre_r = [a / b for a, b in zip(raw["prefill"][p], raw["prefill"]["sdpa"])]
        dec_r = [a / b for a, b in zip(raw["decode"][p], raw["decode"]["sdpa"])]
        steps = raw.get("steps", 1)
        ans = [a + steps * b for a, b in zip(raw["prefill"][p], raw["decode"][p])]
        ans_b = [a + steps * b for a, b in zip(raw["prefill"]["sdpa"], raw["decode"]["sdpa"])]
        rows.append({
            "model": raw["model"], "path": p, "device": raw["device"], "dtype": raw["dtype"],
            "rounds": len(pre_r),
            "answer_ratio": bootstrap_median([a / b for a, b in zip(ans, ans_b)]),
            "prefill_ms": 1e3 * statistics.median(raw["prefill"][p]),
            "decode_ms": 1e3 * statistics.median(raw["decode"][p]),
            "prefill_ratio": bootstrap_median(pre_r), "decode_ratio": bootstrap_median(dec_r),
            "peak_mib": raw["peak_mib"].get(p, memory.get(p, float("nan"))),
        })  # fmt: skip
        if p in raw.get("flops_saved", {}):  # prefill time saved over prefill FLOPs saved, per round
            saved = raw["flops_saved"][p]
            rows[-1]["flops_saved"] = saved
            rows[-1]["time_per_flops_saved"] = bootstrap_median([(1 - r) / saved for r in pre_r]) if saved else None
    return rows


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
    """What a run measures: the testbed model (32 decode steps x 8 rounds), then the LLaVA-1.5-shaped model
    (2 text layers, 8 steps x 5 rounds); `quick`: the testbed model only, 4 steps x 2 rounds (a CI smoke run)."""
    specs = [BenchModel("testbed", steps=4 if quick else 32, reps=2 if quick else 8)]
    if not quick:
        specs.append(BenchModel("llava15-shaped", steps=8, reps=5, layers=2))
    return specs


def run_bench(out: str | Path | None, quick: bool = False, device: str | None = None,
              paths: list[str] | None = None) -> list[dict]:  # fmt: skip
    """Time every path (or `sdpa` and `paths`, `check_paths`) of every model interleaved (one process per
    model), measure CPU memory per path in its own process, and write the Markdown table to `out` (None: write
    nothing). Progress goes to stderr."""
    from rich.console import Console

    from vlm.contract import write_output

    console = Console(stderr=True)
    specs = bench_specs(quick)
    chosen = check_paths(paths)
    rows = []
    for spec in specs:
        layers = str(spec.layers or 0)
        console.print(f"bench: {spec.name}: {len(chosen)} paths x {spec.reps} interleaved rounds")
        raw = _subprocess(["--timing", spec.name, str(spec.steps), str(spec.reps), layers, ",".join(chosen)], device)
        memory: dict[str, float] = {}
        if not raw["peak_mib"] and not quick:  # CPU: one fresh process per path (skipped by the smoke run)
            for p in chosen:
                if p not in raw["errors"]:
                    console.print(f"bench: {spec.name}: memory of {p}")
                    memory[p] = _subprocess(["--memory", spec.name, p, str(spec.steps), layers], device)
        rows += summarise(raw, memory)
    if out is not None:
        old = Path(out).read_text(encoding="utf-8") if Path(out).is_file() else None
        subset = chosen != PATHS
        write_output(out, keep_other_sections(render_markdown(rows, specs, quick, subset), old, subset))
    return rows


#: headings of the sections `lucid bench` writes; any other `## ` section of the file it overwrites is kept
OWN_SECTIONS = ("testbed", "llava15-shaped")


def _section_key(heading: str) -> str:
    """A section's title: its heading before the last colon (titles hold path names, which hold colons)."""
    return heading.rsplit(":", 1)[0]


def keep_other_sections(text: str, existing: str | None, subset: bool = False) -> str:
    """`text` followed by the `## ` sections of `existing` that `lucid bench` does not write (e.g. the SAM
    table of `python -m lucid.bench.sam`), so regenerating BENCHMARKS.md does not drop them. A run of every
    path replaces all of its models' sections (subset ones included); a run of some paths (`subset`) replaces
    only the sections with its own headings and keeps the full tables."""
    written = {_section_key(line[3:]) for line in text.splitlines() if line.startswith("## ")}
    kept, keep = [], False
    for line in (existing or "").splitlines():
        if line.startswith("## "):
            heading = line[3:]
            keep = _section_key(heading) not in written if subset else not heading.startswith(OWN_SECTIONS)
        elif line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    return text if not kept else text.rstrip("\n") + "\n\n" + "\n".join(kept).rstrip("\n") + "\n"


def _mib(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"  # NaN: not measured (the smoke run skips memory)


def _ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"


def render_markdown(rows: list[dict], specs: list[BenchModel], quick: bool, subset: bool = False) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {_machine()}.",
        "",
        "Written by `lucid bench`" + (" --quick" if quick else "") + ". Every path of a model was timed in the "
        "same process, interleaved: in each round every path ran once in a shuffled order. Latencies are "
        "medians over rounds (decode: the median step of each round); `x sdpa` is the median of the per-round "
        "ratios to `sdpa` with a 95 % bootstrap interval: a ratio whose interval contains 1.00 is no measured "
        "difference. Method paths include their preparatory work in prefill (CARVE: both capture passes; "
        "`method:carve` asks about an image already seen, its general pass cached; `method:carve:first` a first "
        "question). `answer x sdpa`: prefill + every decode step, per round, over sdpa's. Peak MiB: memory a "
        "run needed above what was resident before it (CUDA: peak allocated; CPU: peak RSS of one run in a fresh "
        "process, noisy at small sizes). A section whose heading lists paths was written by `lucid bench --path "
        "P ...`: sdpa and those paths only, timed the same way.",
        "",
    ]
    for spec in specs:
        mine = [r for r in rows if r["model"] == spec.name]
        ok = [r for r in mine if "error" not in r]
        base = next(r for r in ok if r["path"] == "sdpa")
        title = spec.name if spec.layers is None else f"{spec.name} ({spec.layers} text layers, random weights)"
        if subset:  # `lucid bench --path ...`: its own section beside the full table
            title += ", " + " vs ".join(r["path"] for r in mine)
        lines += [
            f"## {title}: prefill + {spec.steps} decode steps, {spec.reps} rounds, {base['device']} {base['dtype']}",
            "",
            "| path | prefill ms | x sdpa [95 % CI] | decode ms/token | x sdpa [95 % CI] | answer x sdpa [95 % CI] "
            "| peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            if "error" in r:
                lines.append(f"| {r['path']} | - | - | - | - | - | not run: {r['error']} |")
                continue
            lines.append(
                f"| {r['path']} | {r['prefill_ms']:.1f} | {_ratio(r['prefill_ratio'])} | {r['decode_ms']:.2f} | "
                f"{_ratio(r['decode_ratio'])} | {_ratio(r['answer_ratio'])} | {_mib(r['peak_mib'])} |"
            )
        lines.append("")
        for r in ok:
            if r.get("time_per_flops_saved"):
                lines += [
                    f"`{r['path']}` (`{r['path'].removeprefix('method:')}` with half = layers // 2 - 1) saved "
                    f"{100 * r['flops_saved']:.1f} % of the prefill decoder FLOPs (counted from the shapes run); the "
                    f"prefill time it saved over that share: {_ratio(r['time_per_flops_saved'])} (1.00: time "
                    f"falls as the FLOPs do).",
                    "",
                ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--timing":
        name, steps, rounds, layers, chosen, device = sys.argv[2:8]
        paths = tuple(chosen.split(","))
        print(json.dumps(_timing_worker(name, int(steps), int(rounds), int(layers) or None, device or None, paths)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--memory":
        name, path, steps, layers, device = sys.argv[2:7]
        print(json.dumps(_memory_worker(name, path, int(steps), int(layers) or None, device or None)))
