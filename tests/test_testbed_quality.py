"""The committed tiny LLaVA, on fresh held-out scenes it never saw, through the real generation path.

A small sample (the full measurement is `lucid testbed eval`, numbers in README and metrics.json), so
the bounds here sit a little below the README's targets to absorb sampling noise; they still fail on a
model that does not see.
"""

import pytest

from evals.testbed_metrics import testbed_metrics as run_testbed_suites


@pytest.fixture(scope="module")
def metrics():
    return run_testbed_suites("testbed", 40, 777, [], n_foreign=40, progress=False)


def test_pope_random_and_colour(metrics):
    assert metrics["pope_random"]["accuracy"] >= 0.85
    assert metrics["color_accuracy"] >= 0.85


def test_scenes_drawn_by_other_code(metrics):
    assert metrics["foreign_pope"]["accuracy"] >= 0.85
    assert metrics["foreign_color_accuracy"] >= 0.85


def test_captions_name_the_objects(metrics):
    assert metrics["caption"]["recall"] >= 0.8


def test_the_model_has_a_co_occurrence_prior(metrics):
    """The hallucination tendency the mitigation methods are measured on: more false 'Yes' on the
    absent co-occurrence partners than on random absent objects."""
    adv, rnd = metrics["pope_adversarial"], metrics["pope_random"]
    assert adv["yes_ratio"] > rnd["yes_ratio"]
    assert adv["accuracy"] < rnd["accuracy"]
