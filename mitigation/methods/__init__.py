"""Published training-free interventions, one file each, in one registry.

    from mitigation.methods import parse_method, parse_methods, schema, describe
    methods = parse_methods(["var", "pai:alpha=0.3"])       # or {"name": "pai", "params": {"alpha": 0.3}}
    vlm.generate(vlm, inputs, sampling, methods=methods)

Registered: `carve` (CARVE, arXiv 2509.06461), `dyvte` (DyVTE, arXiv 2411.19628),
`magnifier` (LSceneLLM's scene magnifier in 2D, CVPR 2025),
`pai` (PAI, ECCV 2024), `paint` (the imbalanced-attention fix, arXiv 2501.12206), `var` (VAR, ICLR 2025),
`vcd` (VCD, CVPR 2024), `vhr` (VHR, ACL 2025).
See `mitigation.seam.request` for how a list of methods composes.
"""

from mitigation.methods import carve, dyvte, magnifier, pai, paint, var, vcd, vhr  # noqa: F401  (registers the methods)
from mitigation.methods.registry import (
    BASELINE,
    METHODS,
    Method,
    MethodError,
    build,
    describe,
    get,
    names,
    param,
    parse_method,
    parse_method_set,
    parse_methods,
    register,
    request_schema,
    schema,
)

__all__ = [
    "BASELINE",
    "METHODS",
    "Method",
    "MethodError",
    "build",
    "describe",
    "get",
    "names",
    "param",
    "parse_method",
    "parse_method_set",
    "parse_methods",
    "register",
    "request_schema",
    "schema",
]
