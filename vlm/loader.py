"""Load a real LLaVA-class checkpoint from a local directory (or the embedded testbed), offline.

`load_vlm("testbed")` loads the tiny LLaVA committed in `testbed/weights/tiny-llava`; any other
source is a local llava-hf directory (`LlavaForConditionalGeneration` or
`LlavaNextForConditionalGeneration`). Nothing is ever downloaded. The text backbone gets Lucid's
"lucid" attention (the seam); the vision tower keeps sdpa.

Every failure to load is a `CheckpointError` naming the file and the problem: `vlm.checkpoint` checks
the files without torch first, then whatever transformers / safetensors / tokenizers still refuse
(weights that do not fit config.json, keys missing or left over, a processor that does not match the
vision tower) is caught here. A model that loads has passed a probe of its chat template and processor.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from huggingface_hub.errors import StrictDataclassError  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration  # noqa: E402

import mitigation  # noqa: E402
from lucid.errors import CheckpointError, DeviceError  # noqa: E402
from vlm.checkpoint import TESTBED, TESTBED_DIR, inspect_checkpoint, weights_hash  # noqa: E402

__all__ = ["TESTBED", "TESTBED_DIR", "VLM", "CheckpointError", "default_device_dtype", "load_vlm", "resolve_source"]

_log = logging.getLogger(__name__)
_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
# What transformers / safetensors raise for files they cannot use (config values of the wrong type,
# shapes that do not fit, unreadable weights). Anything else escaping load_vlm is a bug in Lucid.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    ZeroDivisionError,
    OverflowError,
    AssertionError,  # torch validates some module arguments with assert (nn.Embedding's padding_idx)
    SafetensorError,
    StrictDataclassError,  # a config.json value of the wrong type (transformers' config dataclasses)
)


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
    def max_positions(self) -> int | None:
        """The text model's max_position_embeddings: prompt (image tokens included) + new tokens <= this."""
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    @property
    def reserved_tokens(self) -> tuple[str, ...]:
        """Strings a question may not contain: the image token and the tokenizer's special tokens."""
        tok = self.processor.tokenizer
        names = [getattr(self.processor, "image_token", None), *getattr(tok, "all_special_tokens", [])]
        return tuple(sorted({t for t in names if isinstance(t, str) and t}))

    @property
    def name(self) -> str:
        return TESTBED if self.source == TESTBED else self.path.name

    def weights_hash(self) -> str:
        """The checkpoint's identity (`vlm.checkpoint.weights_hash`: sha256 over the weight files, memoised)."""
        return weights_hash(self.path)


def quiet_logs() -> None:
    """transformers' logs and progress bars to errors only (the CLI's and the service's replicas' output
    carries results, not library chatter)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def resolve_source(source: str | os.PathLike) -> Path:
    """Map a source name to a checkpoint directory and check it is a complete, readable llava-hf checkpoint
    (`vlm.checkpoint.inspect_checkpoint`)."""
    return inspect_checkpoint(source).path


def default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA -> bf16 (fp16 where bf16 is unsupported); CPU -> fp32.

    Raises:
        DeviceError: the device is not cpu / cuda[:N], or CUDA is asked for and absent.
    """
    try:
        dev = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: Lucid runs on cpu or cuda")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
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
        CheckpointError: the source is missing, not a directory, lacks files, or a file is malformed or does not
            fit the others (named in the message).
        DeviceError: the device is unknown or absent.
    """
    info = inspect_checkpoint(source)
    path, kind = info.path, info.kind
    dev, dt = default_device_dtype(device, dtype)
    _check_size(path, kind)
    try:
        model, report = _MODEL_CLASSES[kind].from_pretrained(
            path,
            local_files_only=True,
            dtype=dt,
            attn_implementation={"text_config": mitigation.ATTN_IMPLEMENTATION, "vision_config": "sdpa"},
            ignore_mismatched_sizes=True,  # mismatches are reported below, by name, instead of a log table
            output_loading_info=True,
        )
    except _LOAD_ERRORS as e:
        raise CheckpointError(
            f"{path}: config.json and the weights do not load as a {kind} model: {_first_line(e)}"
        ) from None
    _check_report(path, report)
    model.to(dev).eval()
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except _LOAD_ERRORS as e:
        raise CheckpointError(
            f"{path}: the processor (tokenizer + image processor) does not load: {_first_line(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001 (tokenizers raises bare Exception for malformed files)
        if type(e) is not Exception:
            raise
        raise CheckpointError(f"{path}: the tokenizer does not load: {_first_line(e)}") from None
    processor.tokenizer.padding_side = "left"
    _probe(path, kind, model, processor)
    mitigation.install_hidden_capture(model.model.language_model)
    return VLM(model=model, processor=processor, source=str(source), path=path, kind=kind, device=dev, dtype=dt)


def _check_size(path: Path, kind: str) -> None:
    """Refuse a config.json that describes a model far larger than its weights before building it: loading
    initialises every weight the files lack or have in another shape (ignore_mismatched_sizes), so a
    config.json whose `text_config` lost its sizes (Llama's defaults: 6.7 B parameters) would allocate tens
    of GB before `_check_report` could name the mismatch. The model is built on the meta device (no memory)
    and its parameter count compared with the tensors stored in the safetensors files (2x margin: tied or
    shared weights are stored once)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return  # other weight formats: transformers' own loading (and _check_report) decide
    cls = _MODEL_CLASSES[kind]
    try:
        config = cls.config_class.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            meta = cls._from_config(config)
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: config.json does not describe a {kind} model: {_first_line(e)}") from None
    want = sum(p.numel() for p in meta.parameters())
    from safetensors import safe_open

    have = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                have += math.prod(st.get_slice(k).get_shape())
    if want > 2 * have + 1_000_000:
        raise CheckpointError(
            f"{path}: config.json describes a model of {want:,} parameters but the weights hold {have:,}: "
            "config.json does not belong to these weights (check text_config / vision_config sizes)"
        )


def _check_report(path: Path, report: dict) -> None:
    """Refuse weights that do not match config.json: transformers would initialise the missing ones at
    random, drop the extra ones, and re-initialise the mismatched ones, and answer garbage."""
    missing = sorted(report.get("missing_keys") or [])
    unexpected = sorted(report.get("unexpected_keys") or [])
    mismatched = sorted(report.get("mismatched_keys") or [], key=str)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the weights (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weight tensors config.json has no place for (e.g. {unexpected[0]})")
    if mismatched:
        first = mismatched[0]
        example = (
            f"{first[0]}: weights {list(first[1])} vs config {list(first[2])}"
            if isinstance(first, (tuple, list)) and len(first) == 3
            else str(first)
        )
        problems.append(f"{len(mismatched)} tensors whose shape differs from config.json (e.g. {example})")
    if problems:
        raise CheckpointError(f"{path}: the weights do not match config.json: {'; '.join(problems)}")


def _probe(path: Path, kind: str, model: torch.nn.Module, processor) -> None:
    """Format one question with the chat template and process one small image, as build_inputs will, and
    check the image tokens are the ones the vision tower produces."""
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise CheckpointError(f"{path}: the processor has no image processor or tokenizer ({type(processor).__name__})")
    token = getattr(processor, "image_token", None) or "<image>"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    try:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    except _LOAD_ERRORS as e:
        raise CheckpointError(
            f"{path}: the chat template cannot format a question with an image: {_first_line(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001 (jinja2's TemplateError derives from Exception directly)
        if not type(e).__module__.startswith("jinja2"):
            raise
        raise CheckpointError(f"{path}: the chat template is broken: {_first_line(e)}") from None
    if not isinstance(prompt, str) or prompt.count(token) != 1:
        raise CheckpointError(
            f"{path}: the chat template places the image token {token!r} "
            f"{prompt.count(token) if isinstance(prompt, str) else 0} times in a one-image prompt (expected once)"
        )
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None and tok.eos_token_id is None:
        raise CheckpointError(
            f"{path}: neither generation_config.json nor the tokenizer defines an end-of-sequence token (eos_token)"
        )
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer defines neither pad_token nor eos_token (batches are padded)")
    if tok.pad_token_id is None:
        _log.info("%s: the tokenizer has no pad_token; padding with eos_token %r", path, tok.eos_token)
        tok.pad_token = tok.eos_token  # the llava-hf convention; generate() pads with eos too
    try:
        enc = processor(
            images=[Image.new("RGB", (64, 48), (128, 128, 128))], text=[prompt], return_tensors="pt", padding=True
        )
    except _LOAD_ERRORS as e:
        raise CheckpointError(
            f"{path}: the processor cannot process an image with its configuration: {_first_line(e)}"
        ) from None
    if kind == "llava":
        vision = model.config.vision_config
        side = int(enc["pixel_values"].shape[-1])
        cells = (vision.image_size // vision.patch_size) ** 2
        expected = cells + (1 if model.config.vision_feature_select_strategy == "full" else 0)
        got = int((enc["input_ids"] == model.config.image_token_id).sum())
        if side != vision.image_size or got != expected:
            raise CheckpointError(
                f"{path}: the processor makes {got} image tokens from {side}px input but the vision tower takes "
                f"{vision.image_size}px and yields {expected}: processor_config.json / preprocessor_config.json "
                "disagree with config.json (image size, patch size)"
            )
    # one forward pass: what config.json and the weights only show together (and the first call's lazy
    # initialisation, which generation would pay anyway)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dev, dtype) if k == "pixel_values" else v.to(dev)) for k, v in enc.items()}
    try:
        with torch.inference_mode():
            logits = model(**inputs, logits_to_keep=1).logits
    except torch.OutOfMemoryError:
        raise
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: the model fails on a probe image and question: {_first_line(e)}") from None
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            f"{path}: the model gives NaN/inf logits on a probe image and question; a weight or a config.json value "
            "(e.g. rms_norm_eps, layer_norm_eps) is corrupt"
        )


def _first_line(e: BaseException) -> str:
    """The exception's type and the start of its message (two lines at most, 300 characters), in one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2])
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
