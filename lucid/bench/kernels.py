"""Timing of the fused edited-attention kernel against torch SDPA at LLaVA-1.5 shapes, and a compile report.

    python -m lucid.bench.kernels [--rounds 30] [--inner 20] [--json out.json]   # needs CUDA
    python -m lucid.bench.kernels --compile-report [--only NAME,...]              # no GPU needed

**Timing** (`run_bench`): LLaVA-1.5-7B attention (H = Hkv = 32, D = 128, bf16), a prompt of 35 text + 576
image + 29 text tokens: prefill (Tq = Tk = 640, causal) and decode (Tq = 1 over 700 cached keys, batch 1
and 8). Paths: `sdpa` (torch's scaled_dot_product_attention, no edit: the floor), the Triton kernel with
no edit, PAI's logit edit (image keys, last row), VHR's head scale, VAR's redistribution, all of them, all
of them plus the recorder's read-out, and the torch reference with all of them plus the read-out (what
ran on GPU before). Every round runs every path once in a seeded shuffled order; a path's time is the
mean of `inner` back-to-back calls between CUDA events (so host-side preparation counts when it, not the
GPU, is the bottleneck; inputs stay the same, so K / V sit in L2 for every path alike). Per round the
ratio to `sdpa` (paired); reported: the median over rounds and a 95 % bootstrap interval of the median.

**Compile report** (`compile_report`): the kernel compiled for sm_90 as these calls would launch it, with
the shared memory, registers and spill bytes ptxas reports: how `default_config`'s tiles were chosen.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lucid.bench.stats import bootstrap_median
from lucid_kernels.reference import AttentionEdit, KeyEdit, Redistribution, edited_attention_reference

H, D = 32, 128
TEXT_BEFORE, IMAGE, TEXT_AFTER, DECODE_TK = 35, 576, 29, 700
PROMPT = TEXT_BEFORE + IMAGE + TEXT_AFTER  # 640
EDITS = ("none", "pai", "vhr", "var", "all")


def llava15_edit(kind: str, b: int, device, tk0: int = PROMPT) -> AttentionEdit | None:
    """The edits Lucid's methods compile, with fixed coefficients ([B, H]): PAI (|z| scale on the image
    keys' logits, last row), VHR (per-head output scale), VAR (sink mass moved onto image keys after the
    image), or all of them at once."""
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(b, tk0, dtype=torch.bool)
    image[:, TEXT_BEFORE : TEXT_BEFORE + IMAGE] = True
    sink = torch.zeros(b, tk0, dtype=torch.bool)
    sink[:, [0, TEXT_BEFORE + 10, TEXT_BEFORE + 300]] = True
    image, sink = image.to(device), sink.to(device)

    def coef(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, H, generator=g)).to(device)

    pai = KeyEdit(image, "last", coef(0.2, 0.6), None)
    vhr = coef(0.8, 1.5)
    row_start = torch.full((b,), TEXT_BEFORE + IMAGE, device=device)
    var = Redistribution(sink, image & ~sink, image, coef(0.3, 0.8), 0.2, 0.1, row_start)
    return {
        "none": None,
        "pai": AttentionEdit(keys=(pai,)),
        "vhr": AttentionEdit(head_scale=vhr),
        "var": AttentionEdit(redistribute=var),
        "all": AttentionEdit(head_scale=vhr, keys=(pai,), redistribute=var),
    }[kind]


def llava15_inputs(tq: int, tk: int, b: int, device, dtype=torch.bfloat16, seed: int = 0):
    """q [B, H, Tq, D] (a transposed view, as transformers passes it), k and v [B, H, Tk, D]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, H, D, generator=g).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(b, H, tk, D, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v


def _paths(tq: int, tk: int, b: int, device) -> dict:
    """name -> a no-argument callable running that path once on fixed inputs."""
    from lucid_kernels.triton_attention import edited_attention_triton

    q, k, v = llava15_inputs(tq, tk, b, device)
    scale = D**-0.5
    image_index = torch.arange(TEXT_BEFORE, TEXT_BEFORE + IMAGE, device=device).expand(b, IMAGE).contiguous()
    causal = tq > 1
    paths = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    for kind in EDITS:
        edit = llava15_edit(kind, b, device)
        paths[f"triton:{kind}"] = lambda e=edit: edited_attention_triton(q, k, v, None, scale, e)
    edit = llava15_edit("all", b, device)
    paths["triton:all+record"] = lambda: edited_attention_triton(q, k, v, None, scale, edit, image_index, "last")
    paths["reference:all+record"] = lambda: edited_attention_reference(q, k, v, None, scale, edit, image_index, "last")
    return paths


def _time_ms(fn, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


CASES = {"prefill": (PROMPT, PROMPT, 1), "decode": (1, DECODE_TK, 1), "decode-b8": (1, DECODE_TK, 8)}


def run_bench(rounds: int = 30, inner: int = 20, seed: int = 0, cases: tuple[str, ...] = tuple(CASES)) -> list[dict]:
    """Time every path of every case (see the module docstring). Rows: case, path, ms (median over rounds)
    and ratio to sdpa (median, 2.5 %, 97.5 %). Needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("lucid.bench.kernels times GPU kernels: it needs CUDA (torch.cuda.is_available() is False)")
    from lucid_kernels.triton_attention import HAVE_TRITON, interpreting

    if not HAVE_TRITON or interpreting():
        raise RuntimeError("lucid.bench.kernels needs a compiled Triton (importable, TRITON_INTERPRET unset)")
    device = torch.device("cuda")
    rng = random.Random(seed)
    rows = []
    for case in cases:
        tq, tk, b = CASES[case]
        paths = _paths(tq, tk, b, device)
        for fn in paths.values():  # compile, warm up
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            order = list(paths)
            rng.shuffle(order)
            for name in order:
                times[name].append(_time_ms(paths[name], inner))
        for name, ts in times.items():
            ratios = [t / s for t, s in zip(ts, times["sdpa"], strict=True)]
            rows.append(
                {
                    "case": case,
                    "tq": tq,
                    "tk": tk,
                    "batch": b,
                    "path": name,
                    "ms": bootstrap_median(ts, seed)[0],
                    "ratio_to_sdpa": bootstrap_median(ratios, seed),
                }
            )
    return rows


def render(rows: list[dict]) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    lines = [
        f"LLaVA-1.5 attention (H={H}, D={D}, bf16) on {device}; ratio to sdpa: median [95 % bootstrap]",
        "",
        "| case | path | ms / call | ratio to sdpa |",
        "|---|---|---|---|",
    ]
    for r in rows:
        med, lo, hi = r["ratio_to_sdpa"]
        lines.append(f"| {r['case']} (B={r['batch']}, Tq={r['tq']}, Tk={r['tk']}) | {r['path']} | {r['ms']:.4f} | "
                     f"{med:.2f} [{lo:.2f}, {hi:.2f}] |")  # fmt: skip
    return "\n".join(lines)


# ---- compile report (no GPU needed) ------------------------------------------------------------------

REPORT_CASES = {  # name -> (tq, tk, dtype, edit kind, mask kind, record)
    "prefill-none": (PROMPT, PROMPT, torch.bfloat16, "none", None, False),
    "prefill-pai": (PROMPT, PROMPT, torch.bfloat16, "pai", None, False),
    "prefill-var": (PROMPT, PROMPT, torch.bfloat16, "var", None, False),
    "prefill-all": (PROMPT, PROMPT, torch.bfloat16, "all", "bool", True),
    "decode-pai": (1, DECODE_TK, torch.bfloat16, "pai", None, False),
    "decode-all": (1, DECODE_TK, torch.bfloat16, "all", "additive", True),
    "prefill-all-fp32": (PROMPT, PROMPT, torch.float32, "all", "bool", True),
    "decode-all-fp32": (1, DECODE_TK, torch.float32, "all", "bool", True),
}


def _mask(kind: str | None, tq: int, tk: int, dtype):
    if kind is None:
        return None
    allowed = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    if kind == "bool":
        return allowed[None, None]
    return torch.zeros(1, 1, tq, tk, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def compile_report(only: tuple[str, ...] | None = None, arch: int = 90) -> list[dict]:
    """Compile the kernel for sm_`arch` for each `REPORT_CASES` entry with the default tiles; rows with the
    launch config, shared memory bytes, and ptxas's registers and spill-store bytes (None if unparsed)."""
    from triton.backends.nvidia.compiler import get_ptxas

    from lucid_kernels.triton_attention import compile_for, default_config

    rows = []
    for name, (tq, tk, dtype, kind, mask_kind, record) in REPORT_CASES.items():
        if only and name not in only:
            continue
        q, k, v = (torch.empty(1, tq, H, D, dtype=dtype).transpose(1, 2), *(torch.empty(1, H, tk, D, dtype=dtype),) * 2)
        edit = llava15_edit(kind, 1, "cpu", tk0=min(tk, PROMPT))
        kernel = compile_for(q, k, v, _mask(mask_kind, tq, tk, dtype), D**-0.5, edit, record=record, arch=arch)
        regs = spills = None
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            cmd = [get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")]
            info = subprocess.run(cmd, capture_output=True, text=True).stderr
        if m := re.search(r"Used (\d+) registers", info):
            regs = int(m.group(1))
        if m := re.search(r"(\d+) bytes spill stores", info):
            spills = int(m.group(1))
        cfg = default_config(tq, dtype, edit is not None and edit.redistribute is not None)
        rows.append({"case": name, **cfg, "shared": kernel.metadata.shared, "registers": regs, "spill_stores": spills})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lucid.bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20, help="back-to-back calls per timed sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--compile-report", action="store_true", help="compile for sm_90 (no GPU), report spills")
    ap.add_argument("--only", help=f"compile report: comma-separated cases of {', '.join(REPORT_CASES)}")
    args = ap.parse_args(argv)
    if args.compile_report:
        rows = compile_report(tuple(args.only.split(",")) if args.only else None)
        for r in rows:
            print(json.dumps(r))
    else:
        if not torch.cuda.is_available():
            msg = "lucid.bench.kernels: no CUDA device here; timing needs one (--compile-report does not)"
            print(msg, file=sys.stderr)
            return 2
        rows = run_bench(args.rounds, args.inner, args.seed, tuple(args.cases.split(",")))
        print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
