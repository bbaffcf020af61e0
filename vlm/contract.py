"""The request contract beside images: questions, decoding settings, devices, output paths.

Every check here is pure and cheap (standard library only, no torch), so every entry point (the CLI,
the REST API, eval jobs) runs them before doing any work, and raises the typed errors of
`lucid.errors` with a one-line, fix-it message. Outputs are written through `atomic_output`: a file
appears complete at its final path or not at all, and a failure to write is an `OutputError`.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lucid.errors import ContextLengthError, DeviceError, OutputError, QuestionError, SamplingError

IMAGE_PLACEHOLDERS = ("<image>",)  # llava-hf's image token; a checkpoint's own are checked once loaded
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes any int64; Lucid takes the non-negative ones
_DEVICE = re.compile(r"cpu|cuda(:\d{1,3})?")


def check_question(question: object, reserved: Iterable[str] = IMAGE_PLACEHOLDERS) -> str:
    """The question, if it can be asked: non-empty UTF-8 text without tokens the chat template owns.

    Raises:
        QuestionError: empty or whitespace, not encodable as UTF-8, or containing a reserved token
            (the image placeholder, or a special token of the checkpoint's tokenizer).
    """
    if not isinstance(question, str):
        raise QuestionError(f"a question is text, got {type(question).__name__}")
    if not question.strip():
        raise QuestionError("the question is empty; ask something about the image, e.g. 'Describe the image.'")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise QuestionError("the question is not valid UTF-8 text; check the terminal's encoding") from None
    for token in reserved:
        if token and token in question:
            why = "the template places the image itself" if "image" in token.lower() else "a special token"
            raise QuestionError(
                f"the question contains {token!r}, which is reserved for the chat template ({why}); remove it"
            )
    return question


def check_seed(seed: object, what: str = "seed") -> int:
    """`seed` if it is an integer in [0, 2**63 - 1].

    Raises:
        SamplingError: not an integer, or out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SamplingError(f"{what} must be an integer in [0, 2**63 - 1], got {_show(seed)}")
    return seed


def check_sampling(
    max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0
) -> None:
    """Decoding settings in range (SamplingParams runs this too).

    Raises:
        SamplingError: max_new_tokens < 1, temperature negative or not finite, top_p outside (0, 1],
            top_k < 0, or a seed outside [0, 2**63 - 1].
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be an integer >= 1, got {_show(max_new_tokens)}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {_show(temperature)}")
    if not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise SamplingError(f"top_p must be in (0, 1], got {_show(top_p)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SamplingError(f"top_k must be an integer >= 0, got {_show(top_k)}")
    check_seed(seed)


def check_context(prompt_tokens: int, max_new_tokens: int, max_positions: int | None, fit: bool = False) -> int:
    """The number of new tokens to generate: `max_new_tokens` if prompt + max_new_tokens fits the model's
    `max_positions`; with `fit`, what is left of the context (at least 1) instead of failing.

    Args:
        prompt_tokens: the longest row's prompt, image tokens included.
        max_positions: the text model's `max_position_embeddings` (None: unknown, no check).

    Raises:
        ContextLengthError: the prompt leaves no room, or (without `fit`) not room enough.
    """
    if max_positions is None:
        return max_new_tokens
    room = max_positions - prompt_tokens
    if room < 1:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens (the image's included) and the model has {max_positions} "
            f"positions: shorten the question by at least {1 - room} tokens"
        )
    if max_new_tokens <= room:
        return max_new_tokens
    if fit:
        return room
    raise ContextLengthError(
        f"the prompt is {prompt_tokens} tokens (the image's included), plus max_new_tokens {max_new_tokens} is "
        f"{prompt_tokens + max_new_tokens}, over the model's {max_positions} positions: use max_new_tokens <= {room}, "
        "let Lucid lower it (CLI: --fit-context), or shorten the question"
    )


def check_max_new_tokens(max_new_tokens: int, max_positions: int | None) -> int:
    """An early check from config.json alone, before the prompt is tokenized: `max_new_tokens` must leave
    room for a prompt in the model's `max_positions` (`check_context` does the exact check later).

    Raises:
        ContextLengthError: max_new_tokens >= max_positions.
    """
    if max_positions is not None and max_new_tokens >= max_positions:
        raise ContextLengthError(
            f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's {max_positions} positions; "
            "use fewer (the prompt, image tokens included, needs its share), or let Lucid fit it (CLI: --fit-context)"
        )
    return max_new_tokens


def check_device(device: str | None) -> str | None:
    """`device` if it names one Lucid runs on ("cpu", "cuda", "cuda:N"); whether it is present is
    checked when torch is loaded (`vlm.loader.default_device_dtype`).

    Raises:
        DeviceError: any other name.
    """
    if device is None or _DEVICE.fullmatch(device):
        return device
    raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> Path:
    """`path` as a `Path`, if a `what` file can be written there; checked before the work starts.

    It must end in one of `suffixes` (lower-case, with the dot), must not be a directory or an existing
    non-regular file (a device, pipe or socket), and the file (if it exists) or its nearest existing
    ancestor directory must be writable: a file is created and removed there to find out. Missing
    parent directories are created when the output is written.

    Raises:
        OutputError: naming the path and what to change.
    """
    text = os.fspath(path)
    options = " or ".join(suffixes)
    if not text.strip():
        raise OutputError(f"the {what} path is empty; give a file name ending in {options}")
    p = Path(text)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except (OSError, ValueError) as e:
        raise OutputError(f"{what} path {text}: {_reason(e)}") from None
    if (st is not None and stat.S_ISDIR(st.st_mode)) or text.endswith(("/", os.sep)):
        raise OutputError(f"{what} path {text} is a directory; give a file name ending in {options}")
    suffix = p.suffix.lower()
    if not suffix:
        raise OutputError(f"{what} path {text} has no extension; use {options} (e.g. {text}{suffixes[0]})")
    if suffix not in suffixes:
        raise OutputError(f"{what} path {text}: unsupported extension {p.suffix!r}; use {options}")
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} path {text} is not a regular file (a device, pipe or socket); give a file name")
        try:
            with open(p, "ab"):  # opening for append changes nothing
                pass
        except OSError as e:
            raise OutputError(f"{what} path {text} is not writable: {_reason(e)}") from None
        return p
    ancestor = p.parent
    while True:
        try:
            ast = os.stat(ancestor)
        except FileNotFoundError:
            ancestor = ancestor.parent
            continue
        except (OSError, ValueError) as e:
            raise OutputError(f"{what} path {text}: {ancestor}: {_reason(e)}") from None
        break
    if not stat.S_ISDIR(ast.st_mode):
        raise OutputError(f"{what} path {text}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".lucid-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} path {text}: cannot create files in {ancestor}: {_reason(e)}") from None
    return p


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a `Path`, if it is (or can be created as) a writable directory.

    Raises:
        OutputError: it exists and is not a directory, or it cannot be created / written.
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"the {what} directory is empty; give a directory path")
    p = Path(text)
    ancestor = p
    while True:
        try:
            st = os.stat(ancestor)
        except FileNotFoundError:
            ancestor = ancestor.parent
            continue
        except (OSError, ValueError) as e:
            raise OutputError(f"{what} directory {text}: {_reason(e)}") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        where = "it" if ancestor == p else str(ancestor)
        raise OutputError(f"{what} directory {text}: {where} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".lucid-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} directory {text}: cannot create files in {ancestor}: {_reason(e)}") from None
    return p


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write to; when the block ends it replaces
    `path` in one rename, so `path` is either the complete new file or untouched.

    Raises:
        OutputError: the file could not be written (disk full, permissions, ...); the partial
            temporary file is removed.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.stem}.", suffix=p.suffix)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"could not write {p}: {_reason(e)}") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode(p))
        os.replace(tmp, p)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"could not write {p}: {_reason(e)}") from None
    except BaseException:
        _remove(tmp)
        raise


def write_output(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `atomic_output`."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows here, not after the rename
    return Path(path)


def _file_mode(p: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(p).st_mode)  # keep an existing file's permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _show(value: object) -> str:
    """A short, one-line rendering of a rejected value."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a huge int is slow or refused
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
