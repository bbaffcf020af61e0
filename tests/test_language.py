import numpy as np
import pytest

from testbed.studies.evaluate import binary_metrics, parse_yes_no
from testbed.world.language import (
    caption,
    category_frequency,
    cooccurrence,
    mentioned_categories,
    pope_questions,
)
from testbed.world.scenes import TRAIN_CONFIG, partner_of, render_scene, scenes


def test_caption_names_every_object_left_to_right():
    for seed in range(30):
        s = render_scene(seed)
        text = caption(s)
        assert text.startswith("The image shows ") and text.endswith(".")
        assert mentioned_categories(text) == s.categories()


def test_mentioned_categories_handles_plurals_and_punctuation():
    assert mentioned_categories("Two red circles, a Blue square.") == {("red", "circle"), ("blue", "square")}
    assert mentioned_categories("nothing here") == set()


def test_pope_adversarial_negatives_are_absent_partners():
    ref = list(scenes(1, 800, TRAIN_CONFIG))
    freq, co = category_frequency(ref), cooccurrence(ref)
    rng = np.random.default_rng(0)
    checked = 0
    for s in scenes(2, 200):
        absent_partners = {partner_of(c) for c in s.categories()} - s.categories() - {None}
        qs = pope_questions(s, "adversarial", rng, freq, co)
        yes = [q for q in qs if q.answer == "Yes"]
        no = [q for q in qs if q.answer == "No"]
        assert len(yes) == len(no) >= 1
        if absent_partners:
            asked = {q.question for q in no}
            assert any(f"a {c} {sh} in" in q for q in asked for c, sh in absent_partners)
            checked += 1
    assert checked > 20


def test_pope_rejects_unknown_split():
    s = render_scene(0)
    with pytest.raises(ValueError, match="adversarial"):
        pope_questions(s, "hard", np.random.default_rng(0), {}, {})


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes, there is.", "yes"),
        ("There is not a red circle.", "no"),
        ("", "no"),
        ("I see no such object", "no"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_binary_metrics_by_hand():
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
