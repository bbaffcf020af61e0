"""Fast implementations of Lucid's edited attention. Knows nothing of transformers, requests or methods.

`edited_attention` is the public entry point; `reference.py` is its spec. Backends are chosen by
`dispatch.py` (`LUCID_KERNELS=reference|triton|auto`).
"""

from lucid_kernels.dispatch import backend_for, edited_attention
from lucid_kernels.reference import (
    AttentionEdit,
    KeyEdit,
    Redistribution,
    attention_rows_reference,
    edited_attention_reference,
    redistribute_reference,
)

__all__ = [
    "AttentionEdit",
    "KeyEdit",
    "Redistribution",
    "attention_rows_reference",
    "backend_for",
    "edited_attention",
    "edited_attention_reference",
    "redistribute_reference",
]
