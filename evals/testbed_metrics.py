"""`lucid testbed eval`: the testbed suites run as one in-process eval job, scored into the testbed's
metrics JSON (the shape `testbed/weights/tiny-llava/metrics.json` has)."""

from __future__ import annotations

from evals.job import JobSpec, make_plan, run_job
from evals.suites.testbed import TestbedQA, families

SUITES = ("testbed-qa", "testbed-pope", "testbed-chair")


def testbed_eval_metrics(model: str, n: int, seed: int, methods: list, batch_size: int = 16) -> dict:
    """`lucid testbed eval`: every testbed suite (`testbed_metrics` with all three)."""
    return testbed_metrics(model, n, seed, methods, batch_size=batch_size)


def testbed_metrics(
    model: str,
    n: int,
    seed: int,
    methods: list,
    suites: tuple[str, ...] = SUITES,
    batch_size: int = 16,
    n_foreign: int | None = None,
    progress: bool = True,
) -> dict:
    """The testbed suites (`suites`, a subset of SUITES) answered in this process by one eval job (torch
    threads as they are, batches of `batch_size` per question family), scored into the testbed's
    metrics JSON (`testbed.studies.evaluate.score_family` per family, in the family order).

    Args:
        model: 'testbed' or a checkpoint directory; methods: one composed method set (specs), [] = baseline.
        n_foreign: testbed-qa's scenes drawn by other code (None: the suite's default).
        progress: a progress bar on stderr.
    """
    from testbed.studies.evaluate import score_family

    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown testbed suite {unknown[0]!r}; valid: {', '.join(SUITES)}")
    # testbed-qa first: its scenes (foreign ones included) serve the other two suites as well
    specs = []
    for name in SUITES:
        if name in suites:
            extra = f",n_foreign={n_foreign}" if name == "testbed-qa" and n_foreign is not None else ""
            specs.append(f"{name}:n={n},seed={seed}{extra}")
    spec = JobSpec(
        suites=tuple(specs),
        models=(model,),
        methods=(tuple(methods),) if methods else (),
        baseline=not methods,
        workers=0,
        batch_size=batch_size,
        threads=None,
        bootstrap=0,
        progress=progress,
    )
    plan = make_plan(spec)
    run_job(spec, plan)
    answers: dict[str, list[str]] = {}
    items: dict[str, list] = {}
    for cell in plan.cells:
        suite = cell.suite
        for family, (split, _) in suite.FAMILIES.items():
            its = suite.items(split)
            items[family] = its
            answers[family] = [cell.done[f"{split}/{i}"]["answer"] for i in range(len(its))]
    nf = n_foreign if n_foreign is not None else int(TestbedQA.PARAMS["n_foreign"].default)
    order = list(families(n, seed, nf if "testbed-qa" in suites else None))
    results: dict = {"n_scenes": n, "seed": seed}
    for family in order:
        if family in items and items[family]:
            results.update(score_family(family, items[family], answers[family]))
    results["model"] = plan.models[0].name
    results["methods"] = plan.cells[0].methods
    return results
