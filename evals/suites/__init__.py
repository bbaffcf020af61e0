"""The suite registry: a name -> the class that builds its samples, judges answers and names metrics.

    pope            POPE on COCO (bundled question files) or any POPE-format file (--questions)
    chair           CHAIR on COCO captions (ground truth from instance + caption annotations)
    testbed-pope    POPE random / popular / adversarial + the partner-absent split on testbed scenes
    testbed-chair   CHAIR on testbed captions (exact ground truth from the scenes)
    testbed-qa      colour, count, box-as-text and foreign-scene questions (the rest of `testbed eval`)
    testbed-detail  existence / colour / count of small objects on large canvases (CARVE's regime)
    testbed-locate  `lucid locate` on testbed scenes: pointing, box accuracy, mean IoU (baseline only)
    testbed-segment text query -> locate -> SAM on the same objects: mask mIoU, share at IoU >= 0.5
                    (method=heads | read[:k=v;...] | vl-sam[:k=v;...]: the path to SAM, as `lucid segment --method`)
    testbed-detect  open-ended VL-SAM (`lucid segment --all`) per scene: box / mask AP@0.5, recall, absent names

A suite module is imported when its suite is first asked for. Adding a suite is one file with a
`Suite` subclass and one line in `SUITES`; a suite whose samples are not generated answers names its
worker task (`Suite.task`, `evals.worker.TASKS`), as the two grounding suites do.
"""

from __future__ import annotations

import importlib

from evals.suites.base import Data, Param, Sample, Suite, SuiteError, limit_per_split

SUITES: dict[str, str] = {
    "pope": "evals.suites.pope:PopeSuite",
    "chair": "evals.suites.chair:ChairSuite",
    "testbed-pope": "evals.suites.testbed:TestbedPope",
    "testbed-chair": "evals.suites.testbed:TestbedChair",
    "testbed-qa": "evals.suites.testbed:TestbedQA",
    "testbed-detail": "evals.suites.testbed:TestbedDetail",
    "testbed-locate": "evals.suites.grounding:TestbedLocate",
    "testbed-segment": "evals.suites.grounding:TestbedSegment",
    "testbed-detect": "evals.suites.grounding:TestbedDetect",
}


def names() -> list[str]:
    return list(SUITES)


def get(name: str) -> type[Suite]:
    target = SUITES.get(name)
    if target is None:
        raise SuiteError(f"unknown suite {name!r}; valid: {', '.join(SUITES)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'name' or 'name:k=v,k=v' -> (name, {k: v}); a token without '=' continues the previous value
    (`pope:splits=random,popular`)."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    last = None
    for token in rest.split(",") if rest.strip() else []:
        if "=" in token:
            k, _, v = token.partition("=")
            last = k.strip()
            if not last:
                raise SuiteError(f"suite spec {spec!r}: empty parameter name before '='")
            params[last] = v
        elif last is not None:
            params[last] += "," + token
        else:
            raise SuiteError(f"suite spec {spec!r}: expected key=value after '{name}:', got {token!r}")
    return name.strip(), params


def build(spec: str, data: Data = Data()) -> Suite:
    """A suite from `NAME[:k=v,...]` and the job's data options (SuiteError / ImageError on bad input)."""
    name, params = parse_spec(spec)
    return get(name)(data, **params)


__all__ = ["SUITES", "Data", "Param", "Sample", "Suite", "SuiteError", "build", "get", "limit_per_split", "names"]
