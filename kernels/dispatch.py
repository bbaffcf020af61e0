"""Backend choice for the edited attention: explicit, logged once, overridable.

`LUCID_KERNELS=reference` forces the torch reference; `triton` demands the Triton kernels (an error
if they cannot run the call); `auto` (default) uses Triton on CUDA where its verifier accepts the
call and the reference otherwise, logging the reason once per reason.
"""

from __future__ import annotations

import logging
import os

import torch

from kernels.reference import AttentionEdit, Rows, edited_attention_reference

log = logging.getLogger(__name__)
_BACKENDS = ("auto", "reference", "triton")
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def requested_backend() -> str:
    name = os.environ.get("LUCID_KERNELS", "auto").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"LUCID_KERNELS={name!r} is not a backend; valid: {', '.join(_BACKENDS)}")
    return name


def _triton_verifier(query: torch.Tensor) -> tuple[bool, str]:
    # The fused Triton kernels arrive with the single-pass mitigation issue; until then every call is
    # served by the reference, and saying so is the honest answer.
    return False, "no Triton edited-attention kernel is built yet; using the torch reference"


def backend_for(query: torch.Tensor) -> str:
    """The backend that will serve an edited-attention call on `query` ("reference" | "triton")."""
    want = requested_backend()
    if want == "reference":
        return "reference"
    ok, reason = _triton_verifier(query)
    if ok:
        return "triton"
    if want == "triton":
        raise RuntimeError(f"LUCID_KERNELS=triton but the call cannot use Triton: {reason}")
    _log_once(reason)
    return "reference"


def edited_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    edit: AttentionEdit | None = None,
    record_index: torch.Tensor | None = None,
    record_rows: Rows = "all",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Edited attention; see `kernels.reference.edited_attention_reference` for the contract."""
    backend_for(query)
    return edited_attention_reference(query, key, value, mask, scale, edit, record_index, record_rows)
