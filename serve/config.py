"""The service's options: one pydantic model (`AppConfig`), read from a Ray Serve config file.

A Lucid config file IS a Ray Serve config file (the format of `serve build` / `serve deploy`): its
`http_options` give host and port, and its first application imports `serve.app:build_app` with the
`AppConfig` fields as `args`. So the same file starts the service with `lucid serve --config FILE`, and
on an existing cluster with `serve deploy FILE`. Without a file, the embedded default (the testbed LLaVA
and SAM) is served.

    http_options: {host: 127.0.0.1, port: 8000}
    applications:
      - name: lucid
        route_prefix: /
        import_path: serve.app:build_app
        args: {model: /models/llava-1.5-7b-hf, vlm_gpus: 1, image_root: /data/images}

Imports only pydantic and yaml (no torch, no Ray) so the CLI checks a config in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lucid.errors import InputError

IMPORT_PATH = "serve.app:build_app"
#: paths answered without a key by default: the page, health, readiness, metrics and the OpenAPI document
AUTH_EXEMPT = ("/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
KEYS_ENV, ADMIN_KEYS_ENV = "LUCID_API_KEYS", "LUCID_ADMIN_API_KEYS"
APP_NAME = "lucid"


class ConfigError(InputError):
    """A config file or option that cannot be used; the message names the field."""


class AppConfig(BaseModel):
    """What the service serves, where it runs and what it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("testbed", description="'testbed' or a local llava-hf checkpoint directory")
    model_name: str | None = Field(None, description="the id clients send as `model` (default: the checkpoint's name)")
    sam: str = Field("testbed", description="SAM for /v1/segment: testbed, vit_b|vit_l|vit_h:PATH, hf:DIR or DIR")
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:N' (default: cuda if the replica has a GPU)")
    vlm_replicas: int = Field(1, ge=1, le=64)
    vlm_cpus: float = Field(1.0, gt=0, description="CPUs reserved per VLM replica (also its torch threads)")
    vlm_gpus: float = Field(0.0, ge=0, description="GPUs per VLM replica")
    sam_replicas: int = Field(1, ge=1, le=64)
    sam_cpus: float = Field(0.5, gt=0)
    sam_gpus: float = Field(0.0, ge=0)
    ingress_cpus: float = Field(0.25, gt=0)
    batching: bool = Field(True, description="batch concurrent chat requests that share a plan (@serve.batch)")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=10, description="how long a batch waits for company")
    max_ongoing_requests: int = Field(32, ge=1, description="per VLM replica (>= max_batch_size to fill batches)")
    image_root: str | None = Field(None, description="local image paths are served only under this directory")
    allow_remote: list[str] = Field(
        default_factory=list, description="URL prefixes (https://host/...) images may be fetched from; none by default"
    )
    remote_timeout_s: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="request bodies over this get 413")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="encoded image size; over it: 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width x height; over it: 413")
    max_tokens: int = Field(1024, ge=1, description="upper bound on a request's max_tokens")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none (cut to fit)")
    max_n: int = Field(8, ge=1, le=128)
    evals: bool = Field(True, description="POST /v1/evals (Ray Jobs through the cluster's dashboard)")
    dashboard_address: str | None = Field(
        None, description="Ray dashboard URL for eval jobs (default: the one of the cluster the service runs on)"
    )
    eval_root: str = Field("out/evals", description="where eval jobs write (a path the head node sees)")
    eval_models: dict[str, str] = Field(
        default_factory=dict,
        description="more models eval jobs may name, id -> checkpoint ('testbed' or a directory); the served "
        "model is always there under its id",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        repr=False,
        description="keys clients send as `Authorization: Bearer KEY`; none: no auth (loopback only)",
    )
    admin_api_keys: list[str] = Field(
        default_factory=list, repr=False, description="keys that may also run eval jobs (/v1/evals)"
    )
    auth_exempt: list[str] = Field(
        default_factory=lambda: list(AUTH_EXEMPT),
        description="paths answered without a key when keys are configured (every other path needs one)",
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="per VLM / SAM deployment: requests over it get a fast 503 (-1: no limit)"
    )
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of a 503 over the queue limit")
    max_inflight_requests: int = Field(
        -1,
        ge=-1,
        description="per ingress replica: chat / segment requests answered at once; over it a 503 before the body "
        "is read (-1: no limit)",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="a request's deadline (queue and work): past it a 504, its generation stopped"
    )
    max_request_timeout_s: float = Field(
        1800.0, gt=0, description="the most a request may ask for with `timeout_s` (over it: 400)"
    )
    ready_timeout_s: float = Field(
        5.0, gt=0, description="/readyz answers not ready when no model replica answers within this"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on shutdown (SIGTERM), how long in-flight requests may take to finish"
    )

    @field_validator("allow_remote")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith(("http://", "https://")) or p.count("/") < 3:
                raise ValueError(f"{p!r}: a prefix is scheme://host/ (e.g. 'https://images.example.com/')")
        return v

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for i, k in enumerate(v):  # the message names the position, never the key
            if not k or not k.isprintable() or any(c.isspace() for c in k) or not k.isascii():
                raise ValueError(f"key {i}: a key is printable ASCII without spaces (it travels in a header)")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> AppConfig:
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(
                f"request_timeout_s {self.request_timeout_s:g} is over max_request_timeout_s "
                f"{self.max_request_timeout_s:g}"
            )
        return self

    @property
    def auth(self) -> bool:
        """Whether requests need a key (any key configured)."""
        return bool(self.api_keys or self.admin_api_keys)

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.vlm_cpus))


class HttpOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


def _errors(e: ValidationError, where: str) -> str:
    first = e.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}{'.' + path if path else ''}: {first['msg']}{more}"


def app_config(args: dict[str, Any] | None) -> AppConfig:
    """`args` of the application -> AppConfig (ConfigError naming the field)."""
    try:
        return AppConfig(**(args or {}))
    except ValidationError as e:
        raise ConfigError(_errors(e, "args")) from None


def read_config(path: str | Path) -> tuple[AppConfig, HttpOptions, dict]:
    """A Serve config file -> (the app's config, http options, the whole document).

    Raises:
        ConfigError: unreadable YAML, not a Serve config, no application importing serve.app:build_app,
            or a bad field (named).
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list) or not doc["applications"]:
        raise ConfigError(f"config {path}: expected a Ray Serve config with an 'applications' list (see README)")
    apps = [a for a in doc["applications"] if isinstance(a, dict) and a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise ConfigError(
            f"config {path}: no application has import_path {IMPORT_PATH!r} (a file written by `serve build "
            "serve.app:app` runs with `serve deploy FILE`; `lucid serve` reads the builder's args)"
        )
    try:
        http = HttpOptions(**(doc.get("http_options") or {}))
    except ValidationError as e:
        raise ConfigError(_errors(e, f"config {path}: http_options")) from None
    try:
        cfg = AppConfig(**(apps[0].get("args") or {}))
    except ValidationError as e:
        raise ConfigError(_errors(e, f"config {path}: applications[].args")) from None
    return cfg, http, doc


def deployment_limits(cfg: AppConfig) -> dict[str, dict[str, int]]:
    """Per deployment, the Serve options `max_ongoing_requests` (per replica) and `max_queued_requests`
    (per caller; -1: none) `build_app` declares."""
    return {
        "VLMServer": {
            "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.max_batch_size),
            "max_queued_requests": cfg.max_queued_requests,
        },
        "SamServer": {
            "max_ongoing_requests": max(8, cfg.max_ongoing_requests),
            "max_queued_requests": cfg.max_queued_requests,
        },
        # the ingress: with max_inflight_requests, room to refuse the excess itself (in the service's error
        # shape) and a bounded wait in the proxy beyond that (over it the proxy's own 503 + Retry-After)
        "Api": {"max_ongoing_requests": 256, "max_queued_requests": -1}
        if cfg.max_inflight_requests < 0
        else {
            "max_ongoing_requests": 2 * cfg.max_inflight_requests + 16,
            "max_queued_requests": max(1, cfg.max_inflight_requests),
        },
    }


def read_key_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and `#` comments are skipped (ConfigError: unreadable, or no key)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read key file {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    keys = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"key file {path} holds no key (one key per line; blank lines and # comments are skipped)")
    return keys


def env_keys(value: str | None) -> list[str]:
    """A comma-separated environment variable -> keys."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def with_keys(
    cfg: AppConfig,
    key_file: str | Path | None = None,
    admin_key_file: str | Path | None = None,
    environ: dict[str, str] | None = None,
) -> AppConfig:
    """`cfg` with the keys of the files and of LUCID_API_KEYS / LUCID_ADMIN_API_KEYS added (deduplicated)."""
    import os

    environ = os.environ if environ is None else environ
    keys = [*cfg.api_keys, *(read_key_file(key_file) if key_file else []), *env_keys(environ.get(KEYS_ENV))]
    admin = [
        *cfg.admin_api_keys,
        *(read_key_file(admin_key_file) if admin_key_file else []),
        *env_keys(environ.get(ADMIN_KEYS_ENV)),
    ]
    try:
        return AppConfig(
            **{**cfg.model_dump(), "api_keys": list(dict.fromkeys(keys)), "admin_api_keys": list(dict.fromkeys(admin))}
        )
    except ValidationError as e:
        raise ConfigError(_errors(e, "API keys")) from None


def serve_document(cfg: AppConfig, host: str = "127.0.0.1", port: int = 8000) -> dict:
    """The Serve config document for `cfg` (what `serve deploy` takes)."""
    return {
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": cfg.model_dump(exclude_defaults=True),
            }
        ],
    }
