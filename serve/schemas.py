"""The REST API's request and response shapes (pydantic v2): only at this edge, frozen dataclasses inside.

Chat completions follow OpenAI's shape, so its clients work unchanged; Lucid's extensions are the
request fields `interventions` and `grounding` (the `openai` client sends them with `extra_body`) and
the response object `lucid`. The `interventions` items are validated by the method registry itself
(`mitigation.methods.parse_methods`): the OpenAPI document publishes the registry's own JSON schema for
them (`interventions_schema`), so REST validation and the registry cannot drift.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, field_validator

# Scalars are taken as the published schema types them: pydantic's lax mode would take 0 for false or "8"
# for 8, bodies the OpenAPI document calls invalid (found by the schema fuzz, tests/test_serve_fuzz.py)
Float = Annotated[float, Strict()]  # an integer is a number too (JSON Schema), a string or a boolean is not


def _whole(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(**bounds: int) -> Any:
    """JSON Schema's integer within `bounds` (ge, le): 8 or 8.0, never "8" or true. (The bounds go inside,
    before the validator: outside it pydantic publishes them as the non-schema keywords ge / le.)"""
    return Annotated[int, Strict(), Field(**bounds), BeforeValidator(_whole)]


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
    locate: StrictBool = Field(False, description="locate the objects (box, point) with the localization heads")
    masks: StrictBool = Field(False, description="segment the located objects with SAM (COCO RLE); implies locate")
    heatmap: StrictBool = Field(False, description="the answer's attention over the image, as a PNG (base64)")
    queries: list[str] | None = Field(
        None,
        max_length=16,
        description="phrases to locate; default: the objects the answer names (testbed vocabulary), else the question",
    )
    heads: str = Field("auto", description="heatmap heads: 'auto' (localization heads), 'all' (mean) or 'L:H,...'")


# a 32 x 32 PNG (a red disc on white): the published examples' image, which the server answers
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAbklEQVR42u1VQQ7AIAiThv9/Ga/zRE"
    "uC2Ra4KaVFELWIWJ2G1WzfF/DEb3Ys9YY5S/3cVGQgsJPeXICJpzVQz45DXr6mSnFJ/Ezy2wTUl4DA3y8RfwgOiWIknQcq8UqrPG"
    "Fp/A+qjDPJIzACPxTY4jwdQ1SYQtsAAAAASUVORK5CYII="
)
USER_MESSAGE = {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}


class ChatRequest(_Open):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "testbed",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}},
                                {"type": "text", "text": "Is there a red circle in the image?"},
                            ],
                        }
                    ],
                    "max_tokens": 8,
                    "interventions": [{"name": "vhr", "params": {"alpha": 1.5}}],
                    "grounding": {"locate": True, "masks": True},
                }
            ]
        },
    )
    model: str | None = None
    messages: list[Message] = Field(
        ...,
        min_length=1,
        description="system messages, then user / assistant messages alternating, ending with a user message; "
        "at least one user message (else 422); the order and the one image are checked with a 400",
        json_schema_extra={"contains": USER_MESSAGE},
    )
    max_tokens: Int(ge=1) | None = None
    max_completion_tokens: Int(ge=1) | None = None
    temperature: Float = Field(0.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    seed: Int(ge=0, le=2**63 - 1) | None = None
    n: Int(ge=1) = 1
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    interventions: list[Intervention] = Field(default_factory=list, max_length=8)
    grounding: Grounding = Field(default_factory=Grounding)
    ignore_eos: StrictBool = Field(
        False, description="vLLM's extension: generate max_tokens tokens even past the end of the answer"
    )
    timeout_s: Float | None = Field(
        None,
        gt=0,
        description="Lucid: this request's deadline in seconds, queueing included (default: the server's "
        "request_timeout_s; over its max_request_timeout_s: 400); past it a 504, and its work is stopped",
    )

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in v):
            raise ValueError("needs a user message")
        return v


Label = Annotated[Int(ge=0, le=1), Field(description="1 foreground, 0 background")]

# What a segment request must give, besides the image (cross-field, checked by the route with a 400): a
# query; or all; or points (with at most one box) and / or boxes; never a query or all with prompts.
_NO = {"type": "array", "maxItems": 0}
SEGMENT_ONE_OF = [
    {
        "title": "a query",
        "required": ["query"],
        "properties": {"query": {"type": "string"}, "all": {"const": False}, "points": _NO, "boxes": _NO},
    },
    {
        "title": "all objects",
        "required": ["all"],
        "properties": {"all": {"const": True}, "query": {"type": "null"}, "points": _NO, "boxes": _NO},
    },
    {
        "title": "points, with at most one box",
        "required": ["points"],
        "properties": {
            "points": {"type": "array", "minItems": 1},
            "boxes": {"type": "array", "maxItems": 1},
            "query": {"type": "null"},
            "all": {"const": False},
        },
    },
    {
        "title": "boxes",
        "required": ["boxes"],
        "properties": {
            "boxes": {"type": "array", "minItems": 1},
            "points": _NO,
            "query": {"type": "null"},
            "all": {"const": False},
        },
    },
]


class SegmentRequest(BaseModel):
    """Besides the image, exactly one of: a query, all, or prompts (points with at most one box, or boxes).
    The combination is checked by the route (400 naming the field)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": SEGMENT_ONE_OF,
            "examples": [
                {"image": EXAMPLE_IMAGE, "query": "the red circle"},
                {"image": EXAMPLE_IMAGE, "points": [[12, 12, 1]]},
            ],
        },
    )
    image: str = Field(..., min_length=1, description="data: URL, a path under the image root, or an allowed URL")
    query: str | None = Field(None, min_length=1, description="what to segment: located by the VLM, then SAM")
    points: list[tuple[Float, Float, Label]] = Field(default_factory=list, description="[[x, y, 1|0], ...] pixels")
    boxes: list[tuple[Float, Float, Float, Float]] = Field(default_factory=list, description="[[x0, y0, x1, y1]]")
    prompt: Literal["point", "box", "point_box"] = Field("point", description="what a located query gives SAM")
    method: str = Field(
        "heads",
        min_length=1,
        description="how a query becomes SAM prompts: 'heads', 'read[:k=v,...]' (READ's SasP) or 'vl-sam[:k=v,...]'",
    )
    all: StrictBool = Field(False, description="open-ended: every object the VLM names (VL-SAM; no query)")
    timeout_s: Float | None = Field(
        None,
        gt=0,
        description="Lucid: this request's deadline in seconds, queueing included (default: the server's "
        "request_timeout_s; over its max_request_timeout_s: 400); past it a 504, and its work is stopped",
    )


class EvalRequest(BaseModel):
    """An eval job (`lucid eval`, run as a Ray job): the same options as the CLI."""

    model_config = ConfigDict(extra="forbid")
    suites: list[str] = Field(..., min_length=1, description="e.g. ['testbed-pope', 'testbed-chair:n=50']")
    models: list[str] = Field(default_factory=list, description="default: the served model")
    methods: list[str] = Field(default_factory=list, description="method sets, e.g. ['vhr', 'paint+vhr:alpha=1.5']")
    limit: Int(ge=1) | None = None
    workers: Int(ge=0) = Field(0, description="Ray actors; 0 answers in the job's own process")
    batch_size: Int(ge=1, le=256) = 8
    bootstrap: Int(ge=0) = 1000
    no_baseline: StrictBool = False


class ErrorBody(BaseModel):
    message: str = Field(..., description="what is wrong, naming the field (never a key)")
    type: str = Field(..., description="invalid_request_error, authentication_error, permission_error, not_found, ...")
    param: str | None = Field(..., description="the field at fault (e.g. messages.0.content.1), when there is one")
    code: int = Field(..., description="the HTTP status")
    request_id: str = Field(..., description="also in the x-request-id header and the server's log")


class ErrorResponse(BaseModel):
    """Every error the service answers (OpenAI's shape)."""

    error: ErrorBody


class ValidationDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    """A malformed body (not JSON, or against the schema): the error plus every violation with its path."""

    detail: list[ValidationDetail]


def interventions_schema() -> dict[str, Any]:
    """The registry's JSON schema of one intervention (one `oneOf` branch per method)."""
    from mitigation.methods.registry import request_schema

    return request_schema()
