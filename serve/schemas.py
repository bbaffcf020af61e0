"""The REST API's request and response shapes (pydantic v2): only at this edge, frozen dataclasses inside.

Chat completions follow OpenAI's shape, so its clients work unchanged; Lucid's extensions are the
request fields `interventions` and `grounding` (the `openai` client sends them with `extra_body`) and
the response object `lucid`. The `interventions` items are validated by the method registry itself
(`mitigation.methods.parse_methods`): the OpenAPI document publishes the registry's own JSON schema for
them (`interventions_schema`), so REST validation and the registry cannot drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Open(BaseModel):
    """OpenAI's objects carry fields Lucid does not use (name, detail, logprobs ...): accepted, ignored."""

    model_config = ConfigDict(extra="allow")


class ImageUrl(_Open):
    url: str = Field(..., min_length=1, description="data: URL, a path under the image root, or an allowed URL")
    detail: str | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageUrl | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = TextPart | ImagePart


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class Intervention(BaseModel):
    """One registered method and its parameters (validated by the registry: `GET /v1/interventions`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="a registered method (GET /v1/interventions)")
    params: dict[str, Any] = Field(default_factory=dict)


class Grounding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    locate: bool = Field(False, description="locate the objects (box, point) with the localization heads")
    masks: bool = Field(False, description="segment the located objects with SAM (COCO RLE); implies locate")
    heatmap: bool = Field(False, description="the answer's attention over the image, as a PNG (base64)")
    queries: list[str] | None = Field(
        None,
        max_length=16,
        description="phrases to locate; default: the objects the answer names (testbed vocabulary), else the question",
    )
    heads: str = Field("auto", description="heatmap heads: 'auto' (localization heads), 'all' (mean) or 'L:H,...'")


class ChatRequest(_Open):
    model: str | None = None
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    interventions: list[Intervention] = Field(default_factory=list, max_length=8)
    grounding: Grounding = Field(default_factory=Grounding)

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in v):
            raise ValueError("needs a user message")
        return v


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., min_length=1, description="data: URL, a path under the image root, or an allowed URL")
    query: str | None = Field(None, min_length=1, description="what to segment: located by the VLM, then SAM")
    points: list[tuple[float, float, int]] = Field(default_factory=list, description="[[x, y, 1|0], ...] pixels")
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, description="[[x0, y0, x1, y1]]")
    prompt: Literal["point", "box", "point_box"] = Field("point", description="what a located query gives SAM")
    method: str = Field(
        "heads",
        min_length=1,
        description="how a query becomes SAM prompts: 'heads', 'read[:k=v,...]' (READ's SasP) or 'vl-sam[:k=v,...]'",
    )
    all: bool = Field(False, description="open-ended: every object the VLM names (VL-SAM; no query)")

    @field_validator("points")
    @classmethod
    def _labels(cls, v: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
        for i, (_, _, lab) in enumerate(v):
            if lab not in (0, 1):
                raise ValueError(f"point {i}: label must be 1 (foreground) or 0 (background), got {lab}")
        return v


class EvalRequest(BaseModel):
    """An eval job (`lucid eval`, run as a Ray job): the same options as the CLI."""

    model_config = ConfigDict(extra="forbid")
    suites: list[str] = Field(..., min_length=1, description="e.g. ['testbed-pope', 'testbed-chair:n=50']")
    models: list[str] = Field(default_factory=list, description="default: the served model")
    methods: list[str] = Field(default_factory=list, description="method sets, e.g. ['vhr', 'paint+vhr:alpha=1.5']")
    limit: int | None = Field(None, ge=1)
    workers: int = Field(0, ge=0, description="Ray actors; 0 answers in the job's own process")
    batch_size: int = Field(8, ge=1, le=256)
    bootstrap: int = Field(1000, ge=0)
    no_baseline: bool = False


def interventions_schema() -> dict[str, Any]:
    """The registry's JSON schema of one intervention (one `oneOf` branch per method)."""
    from mitigation.methods.registry import request_schema

    return request_schema()
