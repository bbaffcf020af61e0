"""What to change in the text backbone's attention for a request, and the seam that applies it.

Public surface: `Plan`, `LayerEdit`, `scope`, `current`, `AttentionRecorder`, `ATTN_IMPLEMENTATION`.
Importing this package registers the "lucid" attention and mask functions with transformers.
"""

from mitigation.attention import ATTN_IMPLEMENTATION, install_hidden_capture, lucid_attention
from mitigation.context import Active, current, scope
from mitigation.plan import LayerEdit, Plan, compile_edits
from mitigation.recorder import AttentionRecorder

__all__ = [
    "ATTN_IMPLEMENTATION",
    "Active",
    "AttentionRecorder",
    "LayerEdit",
    "Plan",
    "compile_edits",
    "current",
    "install_hidden_capture",
    "lucid_attention",
    "scope",
]
