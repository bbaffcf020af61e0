"""The typed errors of Lucid's input contract: every input Lucid refuses raises one of these.

Each is a `ValueError` (a caller's mistake) whose message names the input, what is wrong with it and
how to fix it, in one line. Entry points (the CLI, the REST API, eval jobs) catch `InputError` and
report it (`lucid: error: ...` and exit 2; an HTTP 4xx); anything else escaping is a bug in Lucid.
This module imports nothing heavy, so front ends can import it before torch.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input Lucid refuses. The message is one line, names the input and says how to fix it."""

    def __init__(self, message: str) -> None:
        # one line, always: front ends print it as is
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))

    @property
    def message(self) -> str:
        return str(self)


class ImageError(InputError):
    """An image that cannot be read, decoded, or is outside the configured limits."""


class ImageTooLargeError(ImageError):
    """An image over a size limit (bytes or pixels, decompression bombs included): HTTP 413 at the REST API."""


class CheckpointError(InputError):
    """A source that is not a loadable llava-hf checkpoint; the message names the file and the problem."""


class QuestionError(InputError):
    """A question that cannot be asked: empty, or containing tokens reserved for the chat template."""


class ContextLengthError(QuestionError):
    """The prompt (image tokens included) plus `max_new_tokens` does not fit the model's positions."""


class SamplingError(InputError):
    """A decoding setting out of range (seed, temperature, top-p, max_new_tokens)."""


class OutputError(InputError):
    """An output path that cannot be written: a directory, unwritable, or an unsupported extension."""


class DeviceError(InputError):
    """A device that does not exist or is not available on this machine."""


class LimitsError(InputError):
    """An image limit (argument or LUCID_MAX_IMAGE_* environment variable) that is not a positive integer."""
