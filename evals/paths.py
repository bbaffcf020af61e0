"""Where a job's files live: readable, path-safe names for models, method sets and suites."""

from __future__ import annotations

import hashlib
import re


def slug(text: str) -> str:
    """A readable, path-safe name; a short hash keeps distinct texts distinct."""
    s = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_.") or "x"
    return s if s == text else f"{s[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"
