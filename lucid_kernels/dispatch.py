"""Backend choice for the edited attention: explicit, logged once, overridable.

`LUCID_KERNELS=reference` forces the torch reference; `triton` demands the fused Triton kernel
(`lucid_kernels.triton_attention`; an error if it cannot run the call; on CPU it needs TRITON_INTERPRET=1, the
tests' way); `auto` (default) uses Triton on CUDA and the reference on CPU, logging the reason once.
"""

from __future__ import annotations

import logging
import os

import torch

from lucid_kernels.reference import AttentionEdit, Rows, edited_attention_reference

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


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_verifier(
    query: torch.Tensor, want: str = "auto", key: torch.Tensor | None = None, value: torch.Tensor | None = None
) -> tuple[bool, str]:
    """Whether the fused kernel (`lucid_kernels.triton_attention`) can serve a call on `query` (and `key` /
    `value` when given), and why not. CPU tensors only when Triton is asked for explicitly and its
    interpreter is on (TRITON_INTERPRET=1, the tests' way)."""
    if not (query.is_cuda or want == "triton"):
        return False, "CPU tensors: the torch reference serves them (Triton needs CUDA or its slow interpreter)"
    try:
        from lucid_kernels.triton_attention import HAVE_TRITON, interpreting
    except Exception as e:  # pragma: no cover
        return False, f"the Triton kernel does not import: {e}"
    if not HAVE_TRITON:
        return False, "triton is not importable; using the torch reference"
    if not query.is_cuda and not interpreting():
        return False, "CPU tensors need TRITON_INTERPRET=1 to run the Triton kernel (tests only: it is slow)"
    if query.dtype not in _DTYPES:
        return False, f"{query.dtype} queries: the Triton kernel takes fp32 / bf16 / fp16"
    if query.shape[-1] > 256:
        return False, f"head dim {query.shape[-1]} > 256: too large for the Triton kernel's tiles"
    if query.is_cuda and query.dtype == torch.bfloat16 and torch.cuda.get_device_capability(query.device) < (8, 0):
        return False, "bf16 on a GPU older than sm_80: Triton has no bf16 dot there"
    for t in (key, value):
        if t is not None and (t.device != query.device or t.shape[-1] != query.shape[-1]):
            return False, "key / value on another device or with another head dim than the query"
    return True, ""


def backend_for(query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> str:
    """The backend that will serve an edited-attention call on `query` ("reference" | "triton")."""
    want = requested_backend()
    if want == "reference":
        return "reference"
    ok, reason = _triton_verifier(query, want, key, value)
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
    """Edited attention; see `lucid_kernels.reference.edited_attention_reference` for the contract."""
    if backend_for(query, key, value) == "triton":
        from lucid_kernels.triton_attention import edited_attention_triton

        return edited_attention_triton(query, key, value, mask, scale, edit, record_index, record_rows)
    return edited_attention_reference(query, key, value, mask, scale, edit, record_index, record_rows)
