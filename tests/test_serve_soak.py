"""A small soak of the service as users run it (`python -m lucid.bench.service soak`, here 40 requests from
3 clients against `lucid serve` with 2 VLM replicas): every request answered or refused with a documented
status (bad requests 400 / 422, deadlines 504, clients that leave), every answer equal to the same
request's solo answer (streamed ones included), the replicas the same processes at the end, still ready,
their memory read at start and end. The full-size figures are in BENCHMARKS.md."""

from __future__ import annotations

from lucid.bench.service import soak, to_markdown


def test_a_small_soak_loses_nothing_and_answers_as_alone():
    res = soak(40, clients=3, seed=1)
    assert res["lost"] == 0, res["lost_examples"]
    assert res["undocumented"] == 0 and res["unequal"] == 0, res["by_kind"]
    assert all(res["replicas_unchanged"].values()) and res["ready_after"] == 200
    kinds = res["by_kind"]
    assert sum(k["n"] for k in kinds.values()) == 40
    assert set(kinds.get("deadline", {"status": {"504": 0}})["status"]) <= {"504"}
    assert all(v is not None for v in res["rss_end_mib"].values())
    assert "| replica | RSS at start" in to_markdown({"soak": res})
