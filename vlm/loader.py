"""Load a real LLaVA-class checkpoint from a local directory (or the embedded testbed), offline.

`load_vlm("testbed")` loads the tiny LLaVA committed in `testbed/weights/tiny-llava`; any other
source is a local llava-hf directory (`LlavaForConditionalGeneration` or
`LlavaNextForConditionalGeneration`). Nothing is ever downloaded. The text backbone gets Lucid's
"lucid" attention (the seam); the vision tower keeps sdpa.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration  # noqa: E402

import mitigation  # noqa: E402

TESTBED = "testbed"
TESTBED_DIR = Path(__file__).resolve().parent.parent / "testbed" / "weights" / "tiny-llava"
_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


class CheckpointError(ValueError):
    """A source that is not a loadable llava-hf checkpoint; the message names what is missing."""


@dataclass(frozen=True)
class VLM:
    """A loaded model with its processor and the facts the rest of Lucid needs."""

    model: torch.nn.Module
    processor: object
    source: str
    path: Path
    kind: str  # "llava" | "llava_next"
    device: torch.device
    dtype: torch.dtype

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def n_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.model.config.text_config.num_attention_heads

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def name(self) -> str:
        return TESTBED if self.source == TESTBED else self.path.name

    def weights_hash(self) -> str:
        """sha256 over the weight files (names and bytes), for reproducibility records."""
        h = hashlib.sha256()
        for f in sorted(self.path.glob("*.safetensors")) + sorted(self.path.glob("*.bin")):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


def resolve_source(source: str | os.PathLike) -> Path:
    """Map a source name to a checkpoint directory and check it is a complete llava-hf checkpoint."""
    path = TESTBED_DIR if str(source) == TESTBED else Path(source).expanduser()
    if not path.exists():
        hint = (
            " (the embedded testbed checkpoint is missing: run `lucid testbed train`)" if str(source) == TESTBED else ""
        )
        raise CheckpointError(f"model source {str(source)!r}: directory {path} does not exist{hint}")
    if not path.is_dir():
        raise CheckpointError(
            f"model source {str(source)!r}: {path} is not a directory (expected a llava-hf checkpoint dir)"
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not ((path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()):
        missing.append("image processor config (preprocessor_config.json or processor_config.json)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise CheckpointError(f"{path} is not a complete llava-hf checkpoint; missing: {'; '.join(missing)}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    kind = config.get("model_type")
    if kind not in _MODEL_CLASSES:
        raise CheckpointError(
            f"{path / 'config.json'} has model_type {kind!r}; Lucid loads {', '.join(sorted(_MODEL_CLASSES))}"
        )
    return path


def default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA -> bf16 (fp16 where bf16 is unsupported); CPU -> fp32."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return dev, dtype


def load_vlm(
    source: str | os.PathLike = TESTBED, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> VLM:
    """Load a LLaVA / LLaVA-NeXT checkpoint from a local directory, or "testbed".

    Raises:
        CheckpointError: the source is missing, not a directory, or lacks files (named in the message).
    """
    path = resolve_source(source)
    kind = json.loads((path / "config.json").read_text())["model_type"]
    dev, dt = default_device_dtype(device, dtype)
    model = _MODEL_CLASSES[kind].from_pretrained(
        path,
        local_files_only=True,
        dtype=dt,
        attn_implementation={"text_config": mitigation.ATTN_IMPLEMENTATION, "vision_config": "sdpa"},
    )
    model.to(dev).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    mitigation.install_hidden_capture(model.model.language_model)
    return VLM(model=model, processor=processor, source=str(source), path=path, kind=kind, device=dev, dtype=dt)
