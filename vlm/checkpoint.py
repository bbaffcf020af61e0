"""What a checkpoint directory must hold before Lucid loads it, checked without torch.

`inspect_checkpoint(source)` reads every file the loader will read (config.json, the safetensors
headers and their sizes, tokenizer.json, the processor and tokenizer configs, the chat template) and
raises `CheckpointError` naming the file and what is wrong with it, in a fraction of a second and
before torch or transformers is imported. `vlm.loader.load_vlm` runs it first, then turns whatever
transformers still refuses into `CheckpointError` too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from lucid.errors import CheckpointError

TESTBED = "testbed"
TESTBED_DIR = Path(__file__).resolve().parent.parent / "testbed" / "weights" / "tiny-llava"
KINDS = ("llava", "llava_next")


def cache_root() -> Path:
    """Lucid's cache (localization heads, VAR calibrations, weights hashes): `LUCID_CACHE` or ~/.cache/lucid."""
    return Path(os.environ.get("LUCID_CACHE", "~/.cache/lucid")).expanduser()


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, in the order the identity hashes them."""
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))


def weights_hash(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A checkpoint's identity: sha256 over its weight files (names and bytes). Remembered in the cache
    (`cache_dir` or `cache_root()`) under the files' names, sizes and mtimes, so a 7B checkpoint is read
    once, not on every call; every cache keyed by checkpoint (heads, VAR, risk, eval records) uses this."""
    path = Path(path)
    files = weight_files(path)
    stat = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([str(path.resolve()), stat]).encode()).hexdigest()[:24]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    memo = root / "weights" / f"{key}.txt"
    try:
        if memo.is_file():
            return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(memo)
    except OSError:  # a read-only cache costs a re-read next time, never the answer
        pass
    return digest


_HEADER_MAX = 100 * 2**20  # safetensors' own bound on the JSON header
# sizes that must be positive integers where config.json gives them (0 or a string crashes model building)
_POSITIVE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "image_size",
    "patch_size",
    "num_channels",
)
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint directory that passed `inspect_checkpoint`.

    Attributes:
        source: what the caller named ("testbed" or a path).
        path: the directory.
        kind: "llava" | "llava_next" (config.json's model_type).
        max_positions: the text model's max_position_embeddings (None when config.json omits it).
        weights: the weight files the loader will read.
    """

    source: str
    path: Path
    kind: str
    max_positions: int | None
    weights: tuple[Path, ...]


def inspect_checkpoint(source: str | os.PathLike) -> CheckpointInfo:
    """Check that `source` ("testbed" or a local directory) is a complete, readable llava-hf checkpoint.

    Raises:
        CheckpointError: the directory is missing, lacks a file, or a file is malformed (not JSON, the
            wrong JSON shape, a truncated or inconsistent safetensors file, an unreadable tokenizer, no
            chat template); the message names the file.
    """
    name = os.fspath(source)
    path = TESTBED_DIR if name == TESTBED else Path(name).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model source {name!r}: cannot read {path}: {e}") from None
    if not exists:
        hint = " (the embedded testbed checkpoint is missing: run `lucid testbed train`)" if name == TESTBED else ""
        raise CheckpointError(f"model source {name!r}: directory {path} does not exist{hint}")
    if not is_dir:
        raise CheckpointError(f"model source {name!r}: {path} is not a directory (expected a llava-hf checkpoint dir)")

    weights = _weight_files(path)
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not weights:
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not ((path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()):
        missing.append("image processor config (preprocessor_config.json or processor_config.json)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        raise CheckpointError(f"{path} is not a complete llava-hf checkpoint; missing: {'; '.join(missing)}")

    config = _json_object(path / "config.json")
    kind = config.get("model_type")
    if kind not in KINDS:
        raise CheckpointError(f"{path / 'config.json'} has model_type {kind!r}; Lucid loads {', '.join(KINDS)}")
    for section in ("text_config", "vision_config"):
        if section in config and not isinstance(config[section], dict):
            raise CheckpointError(
                f"{path / 'config.json'}: {section!r} must be an object, got {_type(config[section])}"
            )
    for section in ("text_config", "vision_config"):
        for key in _POSITIVE:
            value = (config.get(section) or {}).get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CheckpointError(
                    f"{path / 'config.json'}: {section}.{key} must be a positive integer, got {value!r}"
                )
    vocab = (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int):
        text = config.get("text_config") or {}
        ids = {
            "image_token_index": config.get("image_token_index", config.get("image_token_id")),
            **{f"text_config.{k}": text.get(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")},
        }
        for key, value in ids.items():
            for token_id in value if isinstance(value, list) else [value]:
                if isinstance(token_id, int) and not isinstance(token_id, bool) and not 0 <= token_id < vocab:
                    raise CheckpointError(
                        f"{path / 'config.json'}: {key} {token_id} is outside the vocabulary (text_config.vocab_size "
                        f"{vocab})"
                    )
    max_positions = (config.get("text_config") or {}).get("max_position_embeddings")
    if max_positions is not None and (
        isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1
    ):
        raise CheckpointError(
            f"{path / 'config.json'}: text_config.max_position_embeddings must be a positive integer, "
            f"got {max_positions!r}"
        )

    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    _check_processor(path)
    _check_tokenizer(path)
    _check_chat_template(path)
    for optional in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / optional).is_file():
            _json_object(path / optional)
    return CheckpointInfo(source=name, path=path, kind=kind, max_positions=max_positions, weights=tuple(weights))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file")
        files = sorted({str(v) for v in weight_map.values()})
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} lists weight files that are missing: {', '.join(absent[:5])}")
        return [path / f for f in files]
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))


def _check_safetensors(f: Path) -> None:
    """The header parses, every tensor's bytes match its dtype x shape, and the file holds them all."""
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > _HEADER_MAX or 8 + n > size:
                raise CheckpointError(
                    f"{f} is truncated or not a safetensors file ({size:,} bytes; "
                    f"{'no 8-byte header length' if n < 0 else f'its header length field says {n:,} bytes'})"
                )
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{f}: the safetensors header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: the safetensors header must be a JSON object, got {_type(header)}")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, begin, stop])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or stop < begin:
            raise CheckpointError(f"{f}: the header entry for tensor {key!r} is malformed; the file is corrupt")
        width = _DTYPE_BYTES.get(dtype)
        if width is not None and math.prod(shape) * width != stop - begin:
            raise CheckpointError(
                f"{f}: tensor {key!r} is {dtype} {list(shape)} ({math.prod(shape) * width:,} bytes) but the header "
                f"gives it {stop - begin:,} bytes; the file is corrupt"
            )
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{f} is truncated: its header indexes {8 + n + end:,} bytes, the file has {size:,} "
            "(copy or download it again)"
        )
    from safetensors import SafetensorError, safe_open  # light: the Rust reader, no torch

    try:
        with safe_open(str(f), framework="numpy") as st:
            st.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None


def _check_processor(path: Path) -> None:
    pre, proc = path / "preprocessor_config.json", path / "processor_config.json"
    proc_cfg = _json_object(proc) if proc.is_file() else None
    if pre.is_file():
        _json_object(pre)
        return
    section = proc_cfg.get("image_processor") if proc_cfg is not None else None
    if not isinstance(section, dict) or not section:
        raise CheckpointError(
            f"{proc} has no 'image_processor' section and there is no preprocessor_config.json: "
            "the checkpoint has no image processor configuration"
        )


def _check_tokenizer(path: Path) -> None:
    f = path / "tokenizer.json"
    if not f.is_file():
        return  # tokenizer.model (sentencepiece) is checked by transformers when it loads
    from tokenizers import Tokenizer  # light: the Rust library, no torch

    try:
        Tokenizer.from_file(str(f))
    except Exception as e:  # noqa: BLE001 (tokenizers raises bare Exception for every malformed file)
        raise CheckpointError(f"{f} is not a valid tokenizer file: {str(e).splitlines()[0] if str(e) else e}") from None


def _check_chat_template(path: Path) -> None:
    if (path / "chat_template.jinja").is_file():
        return
    if (path / "chat_template.json").is_file():
        if isinstance(_json_object(path / "chat_template.json").get("chat_template"), str):
            return
        raise CheckpointError(f"{path / 'chat_template.json'} has no 'chat_template' string")
    for name in ("tokenizer_config.json", "processor_config.json"):
        if (path / name).is_file() and _json_object(path / name).get("chat_template"):
            return
    raise CheckpointError(
        f"{path} has no chat template (chat_template.jinja, chat_template.json, or 'chat_template' in "
        "tokenizer_config.json / processor_config.json); Lucid formats every question with the checkpoint's template"
    )


def _json_object(f: Path) -> dict:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{f} must be a JSON object, got {_type(data)}")
    return data


def _type(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
