"""`lucid testbed eval`: the testbed suites run as one in-process eval job, scored into the testbed's
metrics JSON (the shape `testbed/weights/tiny-llava/metrics.json` has)."""

from __future__ import annotations

from evals.job import JobSpec, make_plan, run_job
from evals.suites.testbed import TestbedQA, families


def testbed_eval_metrics(model: str, n: int, seed: int, methods: list, batch_size: int = 16) -> dict:
    """`lucid testbed eval`: the three testbed suites answered in this process (torch threads as they
    are, batches of 16 per question family, as `testbed.studies.evaluate.evaluate`), scored into its JSON."""
    from testbed.studies.evaluate import score_family

    # testbed-qa first: its scenes (foreign ones included) serve the other two suites as well
    suites = (f"testbed-qa:n={n},seed={seed}", f"testbed-pope:n={n},seed={seed}", f"testbed-chair:n={n},seed={seed}")
    spec = JobSpec(
        suites=suites,
        models=(model,),
        methods=(tuple(methods),) if methods else (),
        baseline=not methods,
        workers=0,
        batch_size=batch_size,
        threads=None,
        bootstrap=0,
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
    order = list(families(n, seed, int(TestbedQA.PARAMS["n_foreign"].default)))
    results: dict = {"n_scenes": n, "seed": seed}
    for family in order:
        if family in items and items[family]:
            results.update(score_family(family, items[family], answers[family]))
    results["model"] = plan.models[0].name
    results["methods"] = plan.cells[0].methods
    return results
