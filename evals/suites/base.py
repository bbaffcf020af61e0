"""What a suite is: samples (question + image + what counts as right), a judge, and metric kinds.

A suite is built from a spec `NAME[:k=v,...]` (its parameters, each with a type and a default) and the
job's data options (`Data`: `--images`, `--questions`, `--annotations`). Building it reads and checks
its files; `check(samples)` then fails at start, naming the first image that is missing. Nothing here
imports torch: the driver of a job builds suites, the workers only answer their samples.

Per split a suite names a metric kind (`evals.metrics.KINDS`); `judge` turns an answer into the
parsed prediction and the per-sample numbers (`stats`) that kind aggregates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lucid.errors import ImageError, InputError


class SuiteError(InputError):
    """An unknown suite, a bad suite parameter, or a data file a suite cannot use."""


@dataclass(frozen=True)
class Data:
    """The job's data options, shared by every suite that reads files."""

    images: Path | None = None  # --images DIR: the images questions name (COCO val2014 for pope / chair)
    questions: Path | None = None  # --questions FILE: a POPE-format question file instead of the bundled ones
    annotations: Path | None = None  # --annotations DIR|FILE: COCO instances + captions files for chair


@dataclass(frozen=True)
class Sample:
    """One question to answer. `image` is a file path (str) or a PIL image (testbed scenes)."""

    id: str  # unique in the suite and stable across runs: "<split>/<key>"
    split: str
    question: str
    image: Any
    max_new_tokens: int
    target: Any = None  # JSON-able: the label ("yes"/"no"), the truth objects, ...
    meta: dict = field(default_factory=dict)  # JSON-able extras for the record (image file name, ...)


@dataclass(frozen=True)
class Param:
    type: Callable[[str], Any]
    default: Any
    help: str


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _text(text: str) -> str:
    """Strings in k=v specs: `none` is the empty string, `\\n` a newline."""
    return "" if text.strip().lower() == "none" else text.replace("\\n", "\n")


class Suite:
    """Base of the registered suites (`@register("name")`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}
    task: ClassVar[str] = "generate"  # what a worker does with a batch (`evals.worker.TASKS`)
    uses_methods: ClassVar[bool] = True  # False: method sets do not apply; the suite runs in the baseline cell only

    def __init__(self, data: Data = Data(), **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            valid = ", ".join(self.PARAMS) or "none"
            raise SuiteError(f"suite {self.name}: unknown parameter {unknown[0]!r}; valid: {valid}")
        self.data = data
        self.params = {k: p.default for k, p in self.PARAMS.items()}
        for k, v in params.items():
            try:
                self.params[k] = self.PARAMS[k].type(v) if isinstance(v, str) else v
            except (TypeError, ValueError):
                raise SuiteError(f"suite {self.name}: {k}={v!r} is not valid ({self.PARAMS[k].help})") from None
        self.setup()

    # -- to implement ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Read and check the suite's files (raise SuiteError / ImageError)."""

    def splits(self) -> dict[str, str]:
        """split -> metric kind, in report order."""
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """Every sample, grouped by split in `splits()` order, each split in a fixed order."""
        raise NotImplementedError

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        """{"pred": parsed prediction (JSON-able), "stats": {name: number}} for the split's kind."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Data files the results depend on (hashed into the reproducibility record)."""
        return []

    def task_payload(self, samples: list[Sample]) -> dict:
        """Extra JSON-able fields of a batch's payload for the suite's worker task (its settings)."""
        return {}

    # -- shared ------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        changed = [f"{k}={v}" for k, v in self.params.items() if v != self.PARAMS[k].default]
        return self.name + (":" + ",".join(changed) if changed else "")

    def config(self) -> dict:
        """JSON-able: the suite's resolved parameters and the sha256 of its data files."""
        return {
            "suite": self.name,
            "spec": self.spec,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.params.items()},
            "splits": self.splits(),
            "files": {str(f): sha256_file(f) for f in self.files()},
        }

    def check(self, samples: list[Sample]) -> None:
        """Fail at start (ImageError) naming the first image file of `samples` that is missing."""
        seen: set[str] = set()
        for s in samples:
            if isinstance(s.image, str) and s.image not in seen:
                seen.add(s.image)
                p = Path(s.image)
                if not p.is_file():
                    what = "is a directory, not an image" if p.is_dir() else "does not exist"
                    raise ImageError(
                        f"suite {self.name}: image {p} (sample {s.id}) {what}; "
                        f"--images must hold every image the questions name"
                    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def limit_per_split(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` samples of each split (all with None), order kept."""
    if limit is None:
        return list(samples)
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        if seen.get(s.split, 0) < limit:
            seen[s.split] = seen.get(s.split, 0) + 1
            out.append(s)
    return out
