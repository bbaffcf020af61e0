"""Language v3 of the testbed: the benchmarks' prompt formats, paraphrases, held-out paraphrases, detailed
descriptions; and language v1 kept as the committed checkpoint was trained on it."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testbed.studies.data import sample_scene
from testbed.studies.model import build_tokenizer
from testbed.world import language as L
from testbed.world.scenes import TRAIN_CONFIG, Scene, SceneObject, WorldConfig, scenes

WEIGHTS = Path(__file__).resolve().parents[1] / "testbed" / "weights" / "tiny-llava"


def obj(color: str, shape: str, bbox: tuple[int, int, int, int], size: int = 90) -> SceneObject:
    return SceneObject(shape, color, (0, 0, 0), bbox, np.zeros((size, size), bool))


def scene(*objects: SceneObject, occluded: tuple[SceneObject, ...] = (), size: int = 90, bg: int = 120) -> Scene:
    return Scene(Image.new("RGB", (size, size)), tuple(objects), bg, 0, occluded)


# A hand-built scene on a 90 px image: a large red circle top left, a small blue square at the bottom
# centre, a medium green triangle on the right (middle row), a second (small) blue square in the bottom
# right, and an occluded yellow circle behind the red circle.
RED = obj("red", "circle", (5, 5, 35, 35))  # 30x30: area 0.111 -> large; centre (20, 20) -> top left
BLUE = obj("blue", "square", (36, 70, 54, 88))  # 18x18: 0.040 -> small; centre (45, 79) -> at the bottom
GREEN = obj("green", "triangle", (62, 35, 86, 56))  # 24x21: 0.062 -> medium; centre (74, 45.5) -> on the right
BLUE2 = obj("blue", "square", (70, 72, 86, 88))  # 16x16 small; centre (78, 80) -> bottom right
HIDDEN = obj("yellow", "circle", (15, 15, 25, 25))
SCENE = scene(RED, BLUE, GREEN, BLUE2, occluded=(HIDDEN,))


def test_historical_questions_are_unchanged_and_primary():
    assert L.existence_question("red", "circle") == "Is there a red circle in the image?"
    assert L.color_question("square") == "What color is the square?"
    assert L.count_question("triangle") == "How many triangles are there?"
    assert L.CAPTION_QUESTION == "Describe the image."
    for q in ("Is there a {colour} {shape} in the image?", "What color is the {shape}?", "How many {shape}s are"):
        assert q in L.__doc__
    for family, templates in L.QUESTION_FAMILIES.items():
        assert L.training_templates(family)[: L.PRIMARY[family]] == templates[: L.PRIMARY[family]]
    assert L.DETAIL_QUESTIONS[:2] == (
        "Please describe this image in detail.",
        "Please help me describe the image in detail.",
    )


def test_one_eval_only_paraphrase_per_family_never_trained_and_primary_dominates():
    assert set(L.EVAL_ONLY) == set(L.QUESTION_FAMILIES)
    for family, held_out in L.EVAL_ONLY.items():
        assert held_out in L.QUESTION_FAMILIES[family] and held_out not in L.training_templates(family)
        assert len(L.training_templates(family)) >= 3  # the primary one(s) and at least two paraphrases
    rng = np.random.default_rng(0)
    used: dict[str, Counter] = {f: Counter() for f in L.QUESTION_FAMILIES}
    suffixed: Counter = Counter()
    for s in scenes(4, 300, TRAIN_CONFIG):
        for qa in L.sample_qas(s, rng, 4, region=0.3):
            p = L.parse_question(qa.question)
            assert p is not None and p.family == qa.kind, qa
            if qa.kind in used:
                used[qa.kind][p.template] += 1
                suffixed[qa.kind, p.suffix] += 1
    for family, counts in used.items():
        assert L.EVAL_ONLY[family] not in counts
        assert set(counts) == set(L.training_templates(family))
        primary = sum(counts[t] for t in L.QUESTION_FAMILIES[family][: L.PRIMARY[family]])
        share = primary / sum(counts.values())
        assert share > 0.4, (family, share)
        per_primary = primary / L.PRIMARY[family]
        assert all(
            per_primary > n for t, n in counts.items() if t not in L.QUESTION_FAMILIES[family][: L.PRIMARY[family]]
        )
    for family in L.SHORT_ANSWER_FAMILIES:
        share = suffixed[family, True] / (suffixed[family, True] + suffixed[family, False])
        assert 0.2 < share < 0.4, (family, share)
    for family in ("caption", "detail", "where", "region"):
        assert suffixed[family, True] == 0


def test_eval_only_paraphrases_use_only_trained_tokens():
    tok = build_tokenizer()

    def tokens(q: str) -> set[int]:
        return set(tok(q, add_special_tokens=False).input_ids)

    def fill(t: str) -> str:
        return t.format(object="red circle", shape="circle")

    for family, held_out in L.EVAL_ONLY.items():
        trained = set().union(
            *(tokens(fill(t)) for t in L.training_templates(family)),
            *(tokens(fill(t)) for f in L.QUESTION_FAMILIES for t in L.training_templates(f)),
        )
        assert tokens(fill(held_out)) <= trained, held_out


@pytest.mark.parametrize("suffix", [False, True])
def test_short_answer_families_on_a_hand_built_scene(suffix):
    def ask(q: str, occluded: bool = False) -> str | None:
        return L.answer_question(SCENE, L.with_suffix(q) if suffix else q, occluded)

    for t in L.EXISTENCE_TEMPLATES:
        assert ask(L.existence_question("red", "circle", t)) == "Yes"
        assert ask(L.existence_question("yellow", "circle", t)) == "No"
        assert ask(L.existence_question("yellow", "circle", t), occluded=True) == "Yes"
        assert ask(L.existence_question(None, "circle", t)) == "Yes"  # POPE's bare category
        assert ask(L.existence_question(None, "triangle", t)) == "Yes"
        assert ask(L.existence_question("blue", "triangle", t)) == "No"
    assert ask("Is there a circle in the image?") == "Yes"
    assert ask("Does the image contain a red circle?") == "Yes"
    assert ask("Is there a red circle?") == "Yes"
    empty = scene(BLUE)
    for shape, expected in (("circle", "No"), ("triangle", "No"), ("square", "Yes")):
        q = L.existence_question(None, shape)
        assert L.answer_question(empty, L.with_suffix(q) if suffix else q) == expected
    for t in L.COLOR_TEMPLATES:
        assert ask(L.color_question("triangle", t)) == "Green"
        assert ask(L.color_question("circle", t)) == "Red"
        assert ask(L.color_question("circle", t), occluded=True) is None  # two circles: not asked
        assert ask(L.color_question("square", t)) is None
    assert ask("What colour is the triangle?") == ask("What is the color of the triangle?") == "Green"
    for t in L.COUNT_TEMPLATES:
        assert ask(L.count_question("square", t)) == "2"
        assert ask(L.count_question("circle", t), occluded=True) == "2"
    assert ask("How many squares are in the image?") == ask("Count the squares.") == "2"


def test_suffix_keeps_the_one_word_answer_and_other_questions_parse():
    rng = np.random.default_rng(1)
    for s in scenes(6, 60, TRAIN_CONFIG):
        for qa in L.sample_qas(s, rng, 4):
            if qa.kind in L.SHORT_ANSWER_FAMILIES:
                bare = qa.question.removesuffix(L.ANSWER_SUFFIX)
                assert L.answer_question(s, bare, True) == L.answer_question(s, L.with_suffix(bare), True) == qa.answer
                assert len(qa.answer.split()) == 1
    assert L.ANSWER_SUFFIX == "\nAnswer the question using a single word or phrase."
    assert L.parse_question("Is there a purple circle in the image?") is None
    assert L.parse_question("Describe the image") is None
    assert L.parse_question(L.with_suffix("Describe the image.")) is None  # not a short-answer family
    assert L.parse_question("Where is the red circle?").family == "where"
    assert L.answer_question(SCENE, "What is at [6, 6, 39, 39]?") == "A red circle."


def test_caption_and_detail_prompts_on_a_hand_built_scene():
    for q in L.CAPTION_QUESTIONS:  # the short caption, unchanged
        assert L.answer_question(SCENE, q) == "The image shows a red circle, two blue squares and a green triangle."
    expected = (
        "The image contains four objects on a mid grey background. A large red circle is in the top left. "
        "A small blue square is at the bottom. A medium green triangle is on the right. "
        "Another small blue square is in the bottom right. "
        "The red circle is to the left of the green triangle."
    )
    assert L.detailed_description(SCENE) == expected
    for q in L.DETAIL_QUESTIONS:
        assert L.answer_question(SCENE, q) == expected
    with_hidden = L.detailed_description(SCENE, include_occluded=True)
    assert "A small yellow circle is in the top left." in with_hidden
    assert L.mentioned_categories(with_hidden) == SCENE.categories(include_occluded=True)
    lone = L.detailed_description(scene(obj("yellow", "triangle", (40, 40, 50, 50)), bg=170))
    assert lone == (
        "The image contains one object on a light grey background. A small yellow triangle is in the centre. "
        "The yellow triangle is the only object in the image."
    )
    twins = L.detailed_description(scene(BLUE, BLUE2, bg=80))
    assert twins.endswith("In total there are two squares.") and "dark grey" in twins


def test_relations_left_right_above_below():
    size = (90, 90)
    assert L.relation((0, 0, 10, 10), (60, 5, 70, 15), size) == "to the left of"
    assert L.relation((60, 5, 70, 15), (0, 0, 10, 10), size) == "to the right of"
    assert L.relation((40, 0, 50, 10), (45, 60, 55, 70), size) == "above"
    assert L.relation((45, 60, 55, 70), (40, 0, 50, 10), size) == "below"
    assert L.relation((40, 40, 50, 50), (42, 42, 52, 52), size) is None  # an occluded partner on its anchor
    s = scene(obj("red", "circle", (40, 2, 52, 14)), obj("blue", "square", (42, 60, 56, 74)))
    assert "The red circle is above the blue square." in L.detailed_description(s)


@pytest.mark.parametrize("row", range(3))
@pytest.mark.parametrize("col", range(3))
def test_position_phrase_from_the_box_centre_on_a_3x3_grid(row, col):
    size = (120, 90)
    cx, cy = 20 + 40 * col, 15 + 30 * row  # cell centres
    box = (cx - 5, cy - 4, cx + 5, cy + 4)
    phrase = L.position_phrase(box, size)
    assert phrase == L.POSITION_PHRASES[row][col]
    s = Scene(
        Image.new("RGB", size), (SceneObject("circle", "red", (0, 0, 0), box, np.zeros((90, 120), bool)),), 120, 0
    )
    assert f"A small red circle is {phrase}." in L.detailed_description(s)
    assert L.POSITION_PHRASES == (
        ("in the top left", "at the top", "in the top right"),
        ("on the left", "in the centre", "on the right"),
        ("in the bottom left", "at the bottom", "in the bottom right"),
    )


@pytest.mark.parametrize(
    "side,word", [(10, "small"), (19, "small"), (21, "medium"), (26, "medium"), (27, "large"), (60, "large")]
)
def test_size_word_from_box_area_relative_to_the_image(side, word):
    # 90x90 image: area fractions 0.012, 0.045, 0.054, 0.083, 0.090, 0.444 vs thresholds 0.05 / 0.085
    assert L.size_word((0, 0, side, side), (90, 90)) == word
    assert L.size_word((0, 0, 2 * side, 2 * side), (180, 180)) == word  # relative, not absolute


def test_detailed_descriptions_are_30_to_80_tokens_and_name_every_object(capsys):
    tok = build_tokenizer()
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(200):
        s = sample_scene(rng, TRAIN_CONFIG, 128)
        text = L.detailed_description(s, include_occluded=True)
        n = len(tok(" " + text, add_special_tokens=False).input_ids)  # as encode_conversation writes it
        lengths.append(n)
        assert L.mentioned_categories(text) == s.categories(include_occluded=True), text
        assert L.mentioned_categories(L.detailed_description(s)) == s.categories()
        for o in s.all_objects(True):
            assert f"{L.size_word(o.bbox, s.image.size)} {o.name} is {L.position_phrase(o.bbox, s.image.size)}." in text
    assert 30 <= min(lengths) and max(lengths) <= 80
    with capsys.disabled():
        print(
            f"\ndetailed description tokens on 200 training scenes: min {min(lengths)}, "
            f"median {int(np.median(lengths))}, max {max(lengths)}"
        )
    for s in scenes(7, 100, WorldConfig(min_objects=6, max_objects=6)):  # beyond the training range
        assert len(tok(" " + L.detailed_description(s), add_special_tokens=False).input_ids) <= 80


def test_every_v3_word_is_one_token():
    tok = build_tokenizer()
    assert len(tok) < 1000  # the BPE trainer stopped by itself: nothing left to merge
    rng = np.random.default_rng(2)
    for s in scenes(8, 50, TRAIN_CONFIG):
        for qa in L.sample_qas(s, rng, 4):
            for text in (qa.question, qa.answer):
                n = len(tok(" " + text, add_special_tokens=False).input_ids)
                assert n == L._n_words(text) + text.count("\n"), text


def test_sample_qas_v3_answers_from_ground_truth_with_balanced_existence():
    rng = np.random.default_rng(3)
    kinds: Counter = Counter()
    answers: Counter = Counter()
    bare = 0
    for s in scenes(9, 300, TRAIN_CONFIG):
        for qa in L.sample_qas(s, rng, 4, region=0.3):
            assert L.answer_question(s, qa.question, include_occluded=True) == qa.answer, qa
            kinds[qa.kind] += 1
            if qa.kind == "exist":
                answers[qa.answer] += 1
                bare += L.parse_question(qa.question).color is None
    assert set(kinds) == {"exist", "color", "count", "caption", "detail", "where", "region"}
    assert 0.4 < answers["Yes"] / sum(answers.values()) < 0.6
    assert 0.2 < bare / sum(answers.values()) < 0.4
    assert kinds["detail"] > 0.05 * sum(kinds.values())


def test_language_v1_is_the_committed_checkpoints():
    # the tokenizer the committed checkpoint ships is rebuilt exactly from training_corpus("v1")
    shipped = json.loads((WEIGHTS / "tokenizer.json").read_text())["model"]
    rebuilt = json.loads(build_tokenizer(language="v1").backend_tokenizer.to_str())["model"]
    assert rebuilt["vocab"] == shipped["vocab"] and rebuilt["merges"] == shipped["merges"]
    # v1 training data: the four historical questions only, exactly as written
    rng = np.random.default_rng(0)
    historical = {"Describe the image."}
    for s in scenes(10, 50, TRAIN_CONFIG):
        for qa in L.sample_qas(s, rng, 4, language="v1"):
            p = L.parse_question(qa.question)
            assert p.template == L.QUESTION_FAMILIES[p.family][0] and not p.suffix and (p.color or p.family != "exist")
            assert qa.kind != "detail" and (qa.kind != "caption" or qa.question in historical)
    with pytest.raises(ValueError, match="v3"):
        L.sample_qas(s, rng, 1, language="v4")
