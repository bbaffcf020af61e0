"""`lucid bench --quick` times every path interleaved in one process, measures memory per path in its own
process, and writes a well-formed table with ratios and intervals. (No timing asserts: speed is reported,
not tested.)"""

import pytest

from lucid.bench.methods import PATHS, BenchModel, render_markdown, run_bench, summarise
from lucid.bench.stats import bootstrap_median


def test_bench_quick_writes_all_paths(tmp_path):
    out = tmp_path / "B.md"
    rows = run_bench(out, quick=True)
    assert {r["path"] for r in rows} == set(PATHS)
    assert not [r for r in rows if "error" in r]  # every path, methods included, runs on the testbed model
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["rounds"] == 2
        lo, hi = r["decode_ratio"][1:]
        assert lo <= r["decode_ratio"][0] <= hi
    text = out.read_text()
    assert "## testbed" in text and "x sdpa [95 % CI]" in text
    for p in PATHS:
        assert f"| {p} |" in text


def test_summary_pairs_rounds_and_reports_missing_paths():
    raw = {
        "model": "m", "device": "cpu", "dtype": "float32", "peak_mib": {}, "steps": 4,
        "prefill": {p: [10.0, 20.0, 10.0] for p in PATHS},
        "decode": {p: [1.0, 2.0, 1.0] for p in PATHS},
        "errors": {"method:var": "ValueError: no sinks"},
    }  # fmt: skip
    raw["decode"]["lucid-record"] = [1.5, 3.0, 1.5]  # 1.5x in every round, whatever the round's speed
    rows = summarise(raw, {p: 5.0 for p in PATHS})
    rec = next(r for r in rows if r["path"] == "lucid-record")
    assert rec["decode_ratio"] == (1.5, 1.5, 1.5) and rec["decode_ms"] == 1.5e3 and rec["peak_mib"] == 5.0
    text = render_markdown(rows, [BenchModel("m", steps=4, reps=3)], quick=True)
    # the whole answer: (prefill + 4 steps) over sdpa's, per round: (10 + 4 * 1.5) / (10 + 4 * 1) = 8 / 7
    assert rec["answer_ratio"][0] == pytest.approx(8 / 7)
    row = "| lucid-record | 10000.0 | 1.00 [1.00, 1.00] | 1500.00 | 1.50 [1.50, 1.50] | 1.14 [1.14, 1.14] | 5 |"
    assert row in text
    assert "| method:var | - | - | - | - | - | not run: ValueError: no sinks |" in text


def test_an_exit_rows_time_saving_is_set_against_its_flops_saving():
    raw = {
        "model": "m", "device": "cpu", "dtype": "float32", "peak_mib": {}, "steps": 4,
        "prefill": {p: [10.0, 20.0, 10.0] for p in PATHS},
        "decode": {p: [1.0, 2.0, 1.0] for p in PATHS},
        "errors": {}, "flops_saved": {"method:dyvte:layer=half": 0.5},
    }  # fmt: skip
    raw["prefill"]["method:dyvte:layer=half"] = [6.0, 12.0, 6.0]  # 40 % of the time for 50 % of the FLOPs
    rows = summarise(raw, {})
    dy = next(r for r in rows if r["path"] == "method:dyvte:layer=half")
    assert dy["flops_saved"] == 0.5 and dy["time_per_flops_saved"][0] == pytest.approx(0.8)
    assert not [r for r in rows if r["path"] != dy["path"] and "time_per_flops_saved" in r]
    text = render_markdown(rows, [BenchModel("m", steps=4, reps=3)], quick=True)
    assert "saved 50.0 % of the prefill decoder FLOPs" in text and "0.80 [0.80, 0.80]" in text


def test_bootstrap_interval_contains_the_median():
    med, lo, hi = bootstrap_median([1.0, 1.1, 0.9, 1.05, 0.95])
    assert med == 1.0 and 0.9 <= lo <= med <= hi <= 1.1


def test_regenerating_keeps_other_tools_sections():
    from lucid.bench.methods import keep_other_sections

    old = "# Benchmarks\n\nold intro\n\n## testbed: old\n\n| old |\n\n## SAM: tiny\n\n| sam row |\n"
    new = "# Benchmarks\n\nnew intro\n\n## testbed: new\n\n| new |\n"
    merged = keep_other_sections(new, old)
    assert merged == new + "\n## SAM: tiny\n\n| sam row |\n"
    assert keep_other_sections(new, None) == new


def test_a_run_of_some_paths_writes_its_own_sections_beside_the_full_tables():
    from lucid.bench.methods import check_paths, keep_other_sections

    assert check_paths(None) == PATHS
    assert check_paths(["method:dyvte:layer=half"]) == ("sdpa", "method:dyvte:layer=half")
    with pytest.raises(ValueError, match="unknown bench path nope; valid: sdpa"):
        check_paths(["nope"])
    full = "# Benchmarks\n\nintro\n\n## testbed: full\n\n| full |\n\n## SAM: tiny\n\n| sam |\n"
    sub = "# Benchmarks\n\nintro 2\n\n## testbed, sdpa vs method:x: run 1\n\n| sub 1 |\n"
    merged = keep_other_sections(sub, full, subset=True)  # the full table and the SAM table stay
    assert merged == sub + "\n## testbed: full\n\n| full |\n\n## SAM: tiny\n\n| sam |\n"
    again = "# Benchmarks\n\nintro 3\n\n## testbed, sdpa vs method:x: run 2\n\n| sub 2 |\n"
    assert "sub 1" not in keep_other_sections(again, merged, subset=True)  # its own earlier section goes
    other = "# Benchmarks\n\nintro\n\n## testbed, sdpa vs method:y: run 3\n\n| sub 3 |\n"
    assert "sub 1" in keep_other_sections(other, merged, subset=True)  # another path's section stays
    new_full = "# Benchmarks\n\nintro 4\n\n## testbed: full 2\n\n| full 2 |\n"
    assert keep_other_sections(new_full, merged) == new_full + "\n## SAM: tiny\n\n| sam |\n"  # subsets go too


def test_segment_bench_times_every_attention_to_sam_path():
    from lucid.bench.segment import PATHS, measure, to_markdown

    result = measure(rounds=1)
    assert [r["path"] for r in result["rows"]] == list(PATHS)
    assert all(r["median_ms"] > 0 for r in result["rows"])
    assert result["rows"][0]["ratio"] == (1.0, 1.0, 1.0)  # heads against itself
    text = to_markdown(result, threads=1)
    for p in PATHS:
        assert f"| {p} |" in text
