"""`lucid bench --quick` runs every path in its own process and writes a well-formed table.
(No timing asserts: speed is reported, not tested.)"""

from lucid.bench import PATHS, BenchModel, render_markdown, run_bench


def test_bench_quick_writes_all_paths(tmp_path):
    out = tmp_path / "B.md"
    rows = run_bench(out, quick=True)
    assert {r["path"] for r in rows} == set(PATHS)
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["peak_mib"] >= 0
    text = out.read_text()
    assert "## testbed" in text
    for p in PATHS:
        assert f"| {p} |" in text


def test_render_markdown_ratios():
    rows = [
        {
            "model": "m",
            "path": "sdpa",
            "prefill_ms": 10.0,
            "decode_ms": 2.0,
            "peak_mib": 5,
            "device": "cpu",
            "dtype": "float32",
        },
        {
            "model": "m",
            "path": "eager+attn",
            "prefill_ms": 30.0,
            "decode_ms": 3.0,
            "peak_mib": 50,
            "device": "cpu",
            "dtype": "float32",
        },
    ]
    text = render_markdown(rows, [BenchModel("m", steps=4, reps=1)], quick=True)
    assert "| eager+attn | 30.0 | 3.00 | 3.00 | 1.50 | 50 |" in text
