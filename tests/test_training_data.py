"""Training inputs are built exactly like inference inputs, and the training loop really learns."""

import numpy as np
import pytest
import torch

from testbed.studies.data import IGNORE, encode_conversation, make_batch, patch_coverage
from testbed.studies.model import TinyLlavaShape, build_processor, build_tokenizer
from testbed.world import language as L
from testbed.world.language import QA
from testbed.world.scenes import TRAIN_CONFIG, WorldConfig, render_scene

QUESTIONS = [
    QA("Is there a red circle in the image?", "Yes", "exist"),
    QA(L.with_suffix("Is there a red circle in the image?"), "No", "exist"),
    QA(L.with_suffix("Is there a circle in the image?"), "Yes", "exist"),
    QA(L.with_suffix(L.color_question("circle", L.COLOR_TEMPLATES[2])), "Red", "color"),
    QA(L.count_question("square", L.COUNT_TEMPLATES[2]), "3", "count"),
    QA(L.EVAL_ONLY["exist"].format(object="blue square"), "No", "exist"),
    QA("Describe the image.", "The image shows a red circle and a blue square.", "caption"),
    *[QA(q, L.detailed_description(render_scene(0)), "detail") for q in L.DETAIL_QUESTIONS],
]


@pytest.mark.parametrize("shape", [TinyLlavaShape(), TinyLlavaShape.v3()], ids=["v1-12x12", "v3-16x16"])
@pytest.mark.parametrize("qa", QUESTIONS, ids=lambda qa: qa.question[:40])
def test_encoding_matches_processor_and_chat_template(shape, qa):
    proc = build_processor(shape, build_tokenizer())
    ids, labels = encode_conversation(proc, shape.grid**2, [qa])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa.question}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    image = render_scene(0, WorldConfig(size=(shape.image_size, shape.image_size))).image
    ref = proc(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    answer = proc.tokenizer(" " + qa.answer, add_special_tokens=False).input_ids + [proc.tokenizer.eos_token_id]
    assert ids == ref + answer
    assert labels == [IGNORE] * len(ref) + answer
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<image>")) == shape.grid**2
    # the assistant turn as the chat template writes it decodes to the same text
    full = proc.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": qa.answer}]}]
    )
    assert full.endswith(f"ASSISTANT: {qa.answer}</s>")
    assert proc.tokenizer.decode(answer[:-1]).strip() == qa.answer


def test_encoding_of_a_multi_turn_v3_conversation_matches_the_processor():
    shape = TinyLlavaShape.v3()
    proc = build_processor(shape, build_tokenizer())
    rng = np.random.default_rng(0)
    qas = L.sample_qas(render_scene(1, TRAIN_CONFIG), rng, 4, region=0.3)
    ids, _ = encode_conversation(proc, shape.grid**2, qas)
    messages = []
    for i, qa in enumerate(qas):
        parts = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": qa.question}]
        messages += [{"role": "user", "content": parts}, {"role": "assistant", "content": qa.answer}]
    text = proc.apply_chat_template(messages)
    image = render_scene(0, WorldConfig(size=(128, 128))).image
    ref = proc(images=image, text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == ref


def test_patch_coverage_sums_to_one_and_sees_objects():
    s = render_scene(3)
    cov = patch_coverage(s, 96, 12)
    assert cov.shape == (144, 13)
    np.testing.assert_allclose(cov.sum(1), 1.0, atol=1e-5)
    assert (cov[:, 1:].max(0) > 0.5).sum() == len(s.categories())


def test_batches_are_right_padded_with_answer_labels():
    shape = TinyLlavaShape()
    proc = build_processor(shape, build_tokenizer())
    b = make_batch(proc, np.random.default_rng(0), TRAIN_CONFIG, 4)
    assert b.pixel_values.shape == (4, 3, 96, 96)
    lengths = b.attention_mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert (b.labels[i] != IGNORE).sum() > 0
    assert torch.equal((b.input_ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1), torch.full((4,), 144))


def test_v3_batches_carry_256_image_tokens_and_16x16_patch_targets():
    shape = TinyLlavaShape.v3()
    proc = build_processor(shape, build_tokenizer())
    b = make_batch(proc, np.random.default_rng(0), TRAIN_CONFIG, 3, region=0.3)
    assert b.pixel_values.shape == (3, 3, 128, 128) and b.patch_targets.shape == (3, 256, 13)
    assert torch.equal((b.input_ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1), torch.full((3,), 256))


def test_recipes_v3_default_and_v1_reproduces_the_committed_one():
    import json
    from dataclasses import asdict
    from pathlib import Path

    from transformers import LlavaConfig

    from testbed.studies.model import build_config
    from testbed.studies.train import Recipe

    r = Recipe()
    assert r == Recipe.named("v3") and r.language == "v3" and r.shape.grid == 16 and r.shape == TinyLlavaShape.v3()
    committed = json.loads((Path(__file__).resolve().parents[1] / "testbed/weights/tiny-llava/recipe.json").read_text())
    v1 = json.loads(json.dumps(asdict(Recipe.v1()), default=str))
    assert {k: v1[k] for k in committed["recipe"]} == committed["recipe"]
    assert Recipe.v1().region == 0 and Recipe.v1().vision_position == 0 and Recipe.v1().language == "v1"
    shipped = LlavaConfig.from_pretrained(Path(__file__).resolve().parents[1] / "testbed/weights/tiny-llava")
    assert shipped.image_seq_length == Recipe.v1().shape.grid ** 2 == 144
    # weights <= 30 MB (float32)
    config = build_config(r.shape, build_tokenizer(language=r.language))
    from transformers import LlavaForConditionalGeneration

    n = sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())
    assert 4 * n <= 30e6, n


TINY = TinyLlavaShape(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_mlp=64,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_kv_heads=1,
    text_mlp=64,
)


def test_training_resumes_within_a_stage_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from testbed.studies.train import Interrupted, Recipe, train

    recipe = Recipe(
        shape=TINY,
        vision_steps=4,
        vision_batch=2,
        align_steps=5,
        tune_steps=3,
        batch=2,
        warmup=2,
        threads=1,
        eval_scenes=0,
    )
    train(tmp_path / "straight", recipe)  # default save interval: no partial checkpoint is written
    assert not list((tmp_path / "straight" / ".work").glob("*-partial.pt"))

    stops = [("vision", 2), ("align", 3)]  # interrupted twice, each time losing the step just made

    def interrupt(stage: str, step: int) -> None:
        if stops and (stage, step) == stops[0]:
            stops.pop(0)
            raise Interrupted(stage)

    out = tmp_path / "resumed"
    for stage, step in list(stops):
        with pytest.raises(Interrupted):
            train(out, recipe, save_every_s=0, on_step=interrupt)
        state = torch.load(out / ".work" / f"{stage}-partial.pt", weights_only=False)
        assert state["stage"] == stage and state["step"] == step  # steps 0..step-1 saved
        assert {"model", "optimizer", "rng", "torch_rng"} <= set(state)
    record = train(out, recipe, save_every_s=0, on_step=interrupt)
    assert not list((out / ".work").glob("*-partial.pt"))  # finished stages replace their partial
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [e["step"] for e in record["log"] if e["stage"] == "align"] == [0, 4]

    other = tmp_path / "other"  # a partial written by another recipe is refused, not silently mixed
    stops[:] = [("vision", 1)]
    with pytest.raises(Interrupted):
        train(other, recipe, save_every_s=0, on_step=interrupt)
    from dataclasses import replace

    with pytest.raises(ValueError, match="vision-partial.pt was written by another recipe"):
        train(other, replace(recipe, vision_lr=1e-3), save_every_s=0)
    with pytest.raises(ValueError, match="vision.pt was written by another recipe"):  # finished stages too
        train(out, replace(recipe, vision_lr=1e-3), save_every_s=0)


def test_command_line_picks_the_recipe(monkeypatch):
    import testbed.studies.train as T

    seen = {}
    monkeypatch.setattr(T, "train", lambda out, recipe, save_every_s: seen.update(out=out, r=recipe, s=save_every_s))
    T._main(["OUT", "recipe=v1", "seed=3", "save_every_s=60"])
    assert seen["r"] == T.Recipe.v1(seed=3) and seen["s"] == 60.0 and seen["out"] == "OUT"
    T._main(["OUT", "align_steps=10"])
    assert seen["r"] == T.replace(T.Recipe(), align_steps=10) and seen["s"] == 600.0


def test_answer_balanced_loss_weighs_every_answer_the_same():
    from testbed.studies.train import answer_balanced_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 11)
    labels = torch.full((2, 9), IGNORE)
    labels[0, 2:4] = torch.tensor([3, 4])  # a 2-token answer
    labels[0, 5:9] = torch.tensor([1, 2, 3, 4])  # a 4-token answer in the same conversation
    labels[1, 1:2] = torch.tensor([7])  # a 1-token answer
    per_answer = []
    for row, span in ((0, range(2, 4)), (0, range(5, 9)), (1, range(1, 2))):
        pos = torch.tensor(list(span))
        per_answer.append(torch.nn.functional.cross_entropy(logits[row, pos - 1], labels[row, pos]))
    expected = torch.stack(per_answer).mean()
    assert torch.allclose(answer_balanced_loss(logits, labels), expected, atol=1e-6)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert not torch.allclose(token_mean, expected)  # the two losses differ on unequal answers


def test_training_continues_from_a_checkpoint_with_the_answer_loss(tmp_path):
    from safetensors.torch import load_file

    from testbed.studies.train import Recipe, train

    base = Recipe(
        shape=TINY,
        vision_steps=2,
        vision_batch=2,
        align_steps=2,
        tune_steps=0,
        batch=2,
        warmup=1,
        threads=1,
        eval_scenes=0,
    )
    train(tmp_path / "a", base)
    more = Recipe(
        shape=TINY,
        vision_steps=0,
        align_steps=0,
        tune_steps=2,
        batch=2,
        warmup=1,
        threads=1,
        eval_scenes=0,
        loss="answer",
        init=str(tmp_path / "a"),
    )
    record = train(tmp_path / "b", more)
    assert {e["stage"] for e in record["log"]} == {"tune"}  # stages with no steps are skipped
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    vision = [k for k in a if "vision_tower" in k]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in vision) < 0.05  # from a's weights, not from scratch
