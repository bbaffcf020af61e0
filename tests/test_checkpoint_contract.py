"""The checkpoint contract: every broken checkpoint is a CheckpointError naming the file and the problem,
before anything is used (`vlm.checkpoint` without torch, then `load_vlm`'s wrapping and probe); nothing
from transformers / safetensors / tokenizers escapes. Broken copies of the real testbed checkpoint, and
property-based fuzzing of checkpoint directories: a model that answers, or a CheckpointError."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm import CheckpointError, InputError, SamplingParams, build_inputs, generate, load_vlm
from vlm.checkpoint import TESTBED_DIR, inspect_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _edit_json(name: str, edit):
    def apply(d: Path) -> None:
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))

    return apply


def _truncate(name: str, keep: int):
    def apply(d: Path) -> None:
        f = d / name
        f.write_bytes(f.read_bytes()[:keep])

    return apply


def _write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def _remove(name: str):
    return lambda d: (d / name).unlink()


def _shard_index(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))


def _bad_dtype_size(d: Path) -> None:
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s + 1 for s in header[key]["shape"]]
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


# (id, how to break a copy of the testbed checkpoint, what the message must name)
BROKEN = [
    ("truncated-weights", _truncate("model.safetensors", 4_000_000), r"model.safetensors is truncated"),
    ("weights-tiny-stub", _truncate("model.safetensors", 5), r"model.safetensors is truncated or not a safetensors"),
    ("weights-header-garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{garbage}" * 2),
     r"model.safetensors: the safetensors header is not valid JSON"),
    ("weights-shape-vs-bytes", _bad_dtype_size, r"model.safetensors: tensor .* bytes"),
    ("shard-index-missing-file", _shard_index, r"model.safetensors.index.json lists weight files that are missing"),
    ("hidden-size-mismatch", _edit_json("config.json", lambda c: c["text_config"].update(hidden_size=256)),
     r"weights do not match config.json: 61 tensors whose shape differs .* \[384, 128\] vs config \[384, 256\]"),
    ("fewer-layers-than-weights", _edit_json("config.json", lambda c: c["text_config"].update(num_hidden_layers=4)),
     r"weights do not match config.json: 18 weight tensors config.json has no place for"),
    ("more-layers-than-weights", _edit_json("config.json", lambda c: c["text_config"].update(num_hidden_layers=8)),
     r"weights do not match config.json: 18 tensors missing from the weights"),
    ("vocab-mismatch", _edit_json("config.json", lambda c: c["text_config"].update(vocab_size=300)),
     r"shape differs from config.json \(e.g. .*\[384, 128\] vs config \[300, 128\]"),
    ("hidden-size-string", _edit_json("config.json", lambda c: c["text_config"].update(hidden_size="big")),
     r"config.json: text_config.hidden_size must be a positive integer, got 'big'"),
    ("zero-heads", _edit_json("config.json", lambda c: c["text_config"].update(num_attention_heads=0)),
     r"text_config.num_attention_heads must be a positive integer"),
    ("image-token-outside-vocab", _edit_json("config.json", lambda c: c.update(image_token_index=999)),
     r"image_token_index 999 is outside the vocabulary"),
    ("max-positions-negative", _edit_json("config.json", lambda c: c["text_config"].update(max_position_embeddings=-1)),
     r"max_position_embeddings must be a positive integer"),
    ("config-is-a-list", _write("config.json", "[1, 2]"), r"config.json must be a JSON object, got a list"),
    ("config-not-json", _write("config.json", "{not json"), r"config.json is not valid JSON"),
    ("config-wrong-model-type", _edit_json("config.json", lambda c: c.update(model_type="bert")), r"model_type 'bert'"),
    ("text-config-a-string", _edit_json("config.json", lambda c: c.update(text_config="llama")),
     r"'text_config' must be an object, got a string"),
    ("garbage-tokenizer", _write("tokenizer.json", "garbage{"), r"tokenizer.json is not a valid tokenizer file"),
    ("tokenizer-wrong-shape", _write("tokenizer.json", '{"model": {}}'), r"tokenizer.json is not a valid tokenizer"),
    ("tokenizer-config-list", _write("tokenizer_config.json", "[]"), r"tokenizer_config.json must be a JSON object"),
    ("tokenizer-without-special-tokens", _write("tokenizer_config.json", '{"tokenizer_class": "TokenizersBackend"}'),
     r"the tokenizer defines neither pad_token nor eos_token"),
    ("no-chat-template", _remove("chat_template.jinja"), r"has no chat template"),
    ("broken-chat-template", _write("chat_template.jinja", "{% for x in %}"), r"the chat template is broken"),
    ("template-drops-the-image", _write("chat_template.jinja", "{% for m in messages %}{{ m['role'] }}{% endfor %}"),
     r"places the image token '<image>' 0 times"),
    ("processor-config-empty", _write("processor_config.json", "{}"),
     r"processor_config.json has no 'image_processor' section and there is no preprocessor_config.json"),
    ("processor-patch-mismatch", _edit_json("processor_config.json", lambda c: c.update(patch_size=16)),
     r"the processor makes 36 image tokens .* yields 144"),
    ("unknown-image-processor", _edit_json("processor_config.json",
                                           lambda c: c.update(image_processor={"image_processor_type": "Bogus"})),
     r"the processor \(tokenizer \+ image processor\) does not load"),
    ("image-processor-defaults", _edit_json("processor_config.json", lambda c: c.update(image_processor={"a": 1})),
     r"the processor makes 784 image tokens from 224px input but the vision tower takes 96px"),
    ("negative-resize",
     _edit_json("processor_config.json", lambda c: c["image_processor"].update(size={"shortest_edge": -5})),
     r"the processor cannot process an image"),
    ("generation-config-list", _write("generation_config.json", "[]"), r"generation_config.json must be a JSON object"),
    ("norm-eps-nan", _edit_json("config.json", lambda c: c["text_config"].update(rms_norm_eps=-1e30)),
     r"NaN/inf logits on a probe"),
    # Llama's defaults (6.7 B parameters) would be allocated before the weights could be compared
    ("text-config-emptied", _edit_json("config.json", lambda c: c.update(text_config={})),
     r"describes a model of 6,\d{3},\d{3},\d{3} parameters but the weights hold"),
    ("missing-config", _remove("config.json"), r"missing: config.json"),
    ("missing-weights", _remove("model.safetensors"), r"missing: weights"),
    ("missing-tokenizer", _remove("tokenizer.json"), r"missing: tokenizer"),
    ("missing-processor-config", _remove("processor_config.json"), r"missing: image processor config"),
]  # fmt: skip


@pytest.mark.parametrize("breaks,needle", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_testbed_copy_is_a_checkpoint_error_naming_the_problem(tmp_path, breaks, needle):
    d = tmp_path / "ckpt"
    shutil.copytree(TESTBED_DIR, d)
    breaks(d)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_vlm(d)
    assert "\n" not in str(info.value)
    assert str(d) in str(info.value)  # names the checkpoint (and the file where one is at fault)


def test_light_check_runs_without_torch(tmp_path):
    """inspect_checkpoint catches file-level problems in a process that never imports torch."""
    d = tmp_path / "ckpt"
    shutil.copytree(TESTBED_DIR, d)
    _truncate("model.safetensors", 4_000_000)(d)
    code = (
        "import sys\nfrom vlm.checkpoint import inspect_checkpoint\nfrom lucid.errors import CheckpointError\n"
        f"try:\n    inspect_checkpoint({str(d)!r})\nexcept CheckpointError as e:\n    print(e)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "is truncated" in out.stdout
    info = inspect_checkpoint("testbed")
    assert info.kind == "llava" and info.max_positions == 1024 and info.path == TESTBED_DIR


# ---- fuzzing: a model that answers, or a CheckpointError ----

CONFIG_FIELDS = [
    ("text_config", k)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size", "max_position_embeddings", "rms_norm_eps", "head_dim", "hidden_act",
              "pad_token_id", "eos_token_id", "tie_word_embeddings")
] + [("vision_config", k) for k in ("hidden_size", "image_size", "patch_size", "num_hidden_layers",
                                   "num_attention_heads", "hidden_act", "num_channels")] + [
    (None, k) for k in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                        "model_type", "projector_hidden_act", "text_config", "vision_config")
]  # fmt: skip
VALUES = st.one_of(
    st.integers(-2, 300), st.floats(allow_nan=True), st.text(max_size=8), st.none(), st.booleans(),
    st.lists(st.integers(0, 5), max_size=2), st.just({}), st.sampled_from(["gelu", "full", "default", "llava"]),
)  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
MUTATION = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("truncate"), st.integers(0, 99), st.floats(0, 1)),
    st.tuples(st.just("json"), st.integers(0, 99), JSON_VALUES),
    st.tuples(st.just("bytes"), st.integers(0, 99), st.binary(max_size=64)),
    st.tuples(st.just("flip"), st.integers(0, 99), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("field"), st.sampled_from(CONFIG_FIELDS), VALUES),
)


def _mutate(d: Path, mutation) -> None:
    files = sorted(p for p in d.iterdir() if p.is_file())
    kind = mutation[0]
    if kind == "field":
        (section, key), value = mutation[1], mutation[2]
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            return  # an earlier mutation already broke or removed config.json: nothing to edit
        target = cfg.get(section) if section else cfg
        if isinstance(target, dict):
            target[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        return
    f = files[mutation[1] % len(files)]
    if kind == "delete":
        f.unlink()
    elif kind == "truncate":
        raw = f.read_bytes()
        f.write_bytes(raw[: int(len(raw) * mutation[2])])
    elif kind == "json":
        f.write_text(json.dumps(mutation[2]))
    elif kind == "bytes":
        f.write_bytes(mutation[2])
    else:
        raw = bytearray(f.read_bytes())
        if raw:
            raw[min(len(raw) - 1, int(len(raw) * mutation[2]))] = mutation[3]
            f.write_bytes(bytes(raw))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=2))
def test_fuzz_checkpoint_directories(tiny_random_dir, mutations):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        shutil.copytree(tiny_random_dir, d)
        for m in mutations:
            if (d / "config.json").is_file() or m[0] != "field":
                _mutate(d, m)
        try:
            vlm = load_vlm(d)
        except CheckpointError as e:
            assert str(e) and "\n" not in str(e)
            return
        try:  # it loaded: then it answers (or refuses the request with an InputError, e.g. too few positions)
            inputs = build_inputs(vlm, [Image.new("RGB", (40, 30), (200, 0, 0))], ["Describe the image."])
            generate(vlm, inputs, SamplingParams(max_new_tokens=2))
        except InputError:
            pass


def test_no_torch_import_for_pure_contract_modules():
    code = "import sys, vlm, vlm.contract, vlm.images, vlm.checkpoint, lucid.errors\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.stdout.strip() == "False"
