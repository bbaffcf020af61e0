"""What to change in the text backbone's attention for a request, and the seam that applies it.

Public surface: `Plan`, `LayerEdit`, `scope`, `current`, `AttentionRecorder`, `ATTN_IMPLEMENTATION`,
`prepare` / `Request` (a list of methods composed for one generate call; the methods themselves are in
`mitigation.methods`). Importing this package registers the "lucid" attention and mask functions with
transformers.
"""

from mitigation.seam.attention import ATTN_IMPLEMENTATION, install_hidden_capture, lucid_attention
from mitigation.seam.context import Active, current, scope
from mitigation.seam.plan import LayerEdit, Plan, compile_edits
from mitigation.seam.recorder import AttentionRecorder
from mitigation.seam.request import CompositionError, Request, prepare

__all__ = [
    "ATTN_IMPLEMENTATION",
    "Active",
    "AttentionRecorder",
    "CompositionError",
    "LayerEdit",
    "Plan",
    "Request",
    "compile_edits",
    "current",
    "install_hidden_capture",
    "lucid_attention",
    "prepare",
    "scope",
]
