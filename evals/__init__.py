"""Hallucination evaluation jobs: suites (POPE, CHAIR, the testbed's), a models x method sets x suites
matrix on Ray actors, resumable per-sample records, and a report with intervals and paired tests.

    evals.suites   the suite registry (`build("pope:splits=random")`, `names()`)
    evals.job      JobSpec, make_plan, run_job
    evals.report   results.json / report.md / charts
    evals.metrics  aggregations, bootstrap intervals, paired tests
    evals.parse    the POPE answer parser

`lucid eval` (lucid/cli/eval_cmd.py) is the command line.
"""
