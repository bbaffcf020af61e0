"""Loading checkpoints from local paths, offline, with clear errors."""

import json
import shutil

import pytest
from PIL import Image

from vlm import CheckpointError, ImageError, build_inputs, load_image, load_vlm
from vlm.loader import TESTBED_DIR


def test_testbed_checkpoint_is_a_plain_llava_hf_directory():
    from transformers import AutoProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    model = LlavaForConditionalGeneration.from_pretrained(TESTBED_DIR, local_files_only=True)
    proc = AutoProcessor.from_pretrained(TESTBED_DIR, local_files_only=True)
    assert isinstance(proc.tokenizer, PreTrainedTokenizerFast)
    assert type(proc.image_processor).__name__.startswith("CLIPImageProcessor")
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "llama"
    size = sum(f.stat().st_size for f in TESTBED_DIR.glob("*.safetensors"))
    assert size <= 20 * 2**20
    assert (TESTBED_DIR / "recipe.json").is_file() and (TESTBED_DIR / "metrics.json").is_file()


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vlm(tmp_path / "nope")


def test_not_a_directory(tmp_path):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_vlm(f)


@pytest.mark.parametrize(
    "remove,expected",
    [
        ("config.json", "config.json"),
        ("model.safetensors", "weights"),
        ("tokenizer.json", "tokenizer"),
        ("processor_config.json", "image processor config"),
    ],
)
def test_incomplete_checkpoint_names_what_is_missing(tiny_random_dir, tmp_path, remove, expected):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_random_dir, d)
    (d / remove).unlink()
    with pytest.raises(CheckpointError, match=expected):
        load_vlm(d)


def test_wrong_model_type(tiny_random_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_random_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        load_vlm(d)


def test_malformed_config(tiny_random_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_random_dir, d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_vlm(d)


def test_cpu_loads_fp32(tiny_vlm):
    import torch

    assert tiny_vlm.dtype == torch.float32 and tiny_vlm.device.type == "cpu"


def test_bad_images(tmp_path, tiny_vlm):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(bad)
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (10, 10)
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        build_inputs(tiny_vlm, [Image.new("RGB", (8, 8))] * 2, ["Describe the image."])
