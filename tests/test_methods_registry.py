"""The method registry: names, parsing from `name:k=v` and JSON through one validator, schemas from the
dataclasses, and the layer rules of each method at LLaVA-1.5-7B's depth (32) and the testbed's (6)."""

import json
from dataclasses import dataclass, fields

import pytest

from mitigation.methods import (
    METHODS,
    Method,
    MethodError,
    describe,
    param,
    parse_method,
    parse_methods,
    register,
    schema,
)
from mitigation.methods.pai import PAI, first_edited_layer
from mitigation.methods.paint import Paint
from mitigation.methods.var import VAR, default_tau
from mitigation.methods.vhr import VHR, vhr_layers


def test_registered_names():
    assert sorted(METHODS) == ["carve", "dyvte", "magnifier", "pai", "paint", "var", "vcd", "vhr"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        MethodError, match=r"unknown method 'opera'; valid: carve, dyvte, magnifier, pai, paint, var, vcd, vhr"
    ):
        parse_method("opera:alpha=1")
    with pytest.raises(MethodError, match="valid: carve, dyvte, magnifier, pai, paint, var, vcd, vhr"):
        parse_method({"name": "nope"})


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):

        @register("pai")
        @dataclass(frozen=True)
        class Other(Method):
            x: float = param(1.0, "x")

    assert METHODS["pai"] is PAI


def test_a_parameter_may_not_hide_what_every_method_has():
    """A parameter named `label` would replace Method.label, the name eval reports and file paths use."""
    with pytest.raises(TypeError, match="'label' would hide Method.label"):

        @register("hides-label")
        @dataclass(frozen=True)
        class Hiding(Method):
            label: str = param("a", "x")

    assert "hides-label" not in METHODS


def test_both_syntaxes_give_the_same_method():
    a = parse_method("var:p=0.3,rho=0.8,sink_dims=1415,2533,semantics=code")
    b = parse_method(
        '{"name": "var", "params": {"p": 0.3, "rho": 0.8, "sink_dims": [1415, 2533], "semantics": "code"}}'
    )
    c = parse_method({"name": "var", "params": {"p": "0.3", "rho": 0.8, "sink_dims": "1415,2533", "semantics": "code"}})
    d = VAR(p=0.3, rho=0.8, sink_dims=(1415, 2533), semantics="code")
    assert a == b == c == d
    assert a.sink_dims == (1415, 2533) and isinstance(a.p, float)
    assert parse_method(a.to_json()) == a  # JSON round trip
    assert parse_method(a.label) == a  # the label is a valid spec
    assert parse_method("pai") == PAI()
    two = '[{"name": "pai"}, {"name": "vhr", "params": {"alpha": 3, "scale_free_stream": false}}]'
    assert parse_methods(two) == (PAI(), VHR(alpha=3.0, scale_free_stream=False))
    assert parse_method("vhr:outlier_rule=false,layers=1,2").outlier_rule is False


@pytest.mark.parametrize(
    "spec, message",
    [
        ("var:p=1.5", r"var: p must be a number in \[0, 1\], got '1.5'"),
        ("var:p=abc", "var: p must be a number"),
        ("pai:gamma=0.5", r"pai: gamma must be a number in \[1, 5\]"),
        ("paint:heads=some", "paint: heads must be one of uniform, sensitive"),
        ("pai:preset=code", "pai: preset must be one of official, paper"),
        ("vhr:outlier_rule=maybe", "vhr: outlier_rule must be true or false"),
        ("vhr:layers=1,-2", "vhr: layers must be integers >= 0"),
        ("var:q=1", "var: unknown parameter 'q'; valid: preset, p, rho, "),
        ("var:p=0.1,p=0.2", "given twice"),
        ("var:0.5", "expected key=value"),
        ('{"name": "var", "params": {"p": true}}', "var: p must be a number"),
        ('{"name": "var", "extra": 1}', "unknown key 'extra'"),
        ('{"name": "var"', "does not parse"),
    ],
)
def test_bad_values_are_rejected_with_what_is_valid(spec, message):
    with pytest.raises(MethodError, match=message):
        parse_method(spec)


def test_direct_construction_is_validated_by_the_same_code():
    with pytest.raises(MethodError, match=r"var: p must be a number in \[0, 1\]"):
        VAR(p=2.0)
    assert VAR(p=1).p == 1.0 and isinstance(VAR(p=1).p, float)


def test_schema_from_the_dataclass():
    s = schema("var")
    assert s["additionalProperties"] is False and "ICLR 2025" in s["x-paper"]
    p = s["properties"]["p"]
    assert p == {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.6, "description": p["description"]}
    assert s["properties"]["semantics"]["enum"] == ["paper", "code"]
    dims = s["properties"]["sink_dims"]
    assert dims["default"] is None and {"type": "null"} in dims["anyOf"]
    assert dims["anyOf"][0]["items"] == {"type": "integer", "minimum": 0}
    for name in METHODS:
        sch = schema(name)
        json.dumps(sch)  # JSON-able
        assert set(sch["properties"]) == {f.name for f in fields(METHODS[name])}
        for prop in sch["properties"].values():
            assert prop["description"] and "default" in prop


def test_describe_lists_parameters_defaults_and_ranges():
    rows = {r["name"]: r for r in describe()}
    alpha = next(p for p in rows["pai"]["params"] if p["name"] == "alpha")
    assert alpha["default"] == 0.2 and alpha["range"] == "a number in [0, 5]" and alpha["type"] == "float"
    assert "arXiv:2501.12206" in rows["paint"]["paper"]
    presets = rows["pai"]["presets"]
    assert presets["official"]["values"]["alpha"] == 0.2 and presets["paper"]["values"]["alpha"] == 0.5
    assert "README.md:65" in presets["official"]["source"] and "2407.21771" in presets["paper"]["source"]


def test_the_default_is_the_official_configuration():
    """Each method's defaults are what the official repository's evaluation scripts ran (cited in PRESETS)."""
    pai = PAI()
    assert (pai.preset, pai.alpha, pai.gamma, pai.cutoff, pai.first_token) == ("official", 0.2, 1.1, 0.1, False)
    paint = Paint()
    assert (paint.alpha, paint.beta, paint.local_ratio, paint.heads) == (0.7, 0.4, 0.25, "uniform")
    assert (paint.gamma, paint.first_token) == (1.1, False)  # every committed result file is *_cfg_1.1
    assert (VHR().alpha, VHR().free_stream, VHR().first_token) == (2.0, "strip", True)
    v = VAR()
    assert (v.semantics, v.require_image_sink, v.exclude_last) == ("code", True, False)
    # the code keeps p = 0.6 of the sink mass (moves 0.4) and tests the sink share <= rho = 0.5
    assert v.moved_fraction == pytest.approx(0.4) and v.min_nonsink_ratio == pytest.approx(0.5)
    for cls in (PAI, Paint, VHR, VAR):
        official = cls.PRESETS["official"].values
        assert all(getattr(cls(), k) == val for k, val in official.items()), cls.name


def test_paper_preset_and_explicit_overrides():
    pai = parse_method("pai:preset=paper")
    assert (pai.alpha, pai.first_token, pai.preset) == (0.5, True, "paper")
    assert pai.label == "pai:preset=paper"
    # an explicit value wins over the preset, even when it equals the official default
    mixed = parse_method("pai:preset=paper,alpha=0.2")
    assert (mixed.alpha, mixed.first_token) == (0.2, True) and mixed.label == "pai:preset=paper,alpha=0.2"
    assert parse_method(mixed.to_json()) == mixed and parse_method(mixed.label) == mixed
    same = parse_method({"name": "pai", "params": {"preset": "paper", "gamma": 1}})
    assert (same.alpha, same.gamma) == (0.5, 1.0)
    paint = parse_method("paint:preset=paper")
    assert (paint.gamma, paint.first_token, paint.heads) == (1.0, True, "uniform")
    var = parse_method("var:preset=paper")
    assert (var.semantics, var.require_image_sink, var.exclude_last, var.moved_fraction) == ("paper", False, True, 0.6)
    # direct construction: the preset fills what is left at its default
    assert VAR(preset="paper").semantics == "paper" and VAR(preset="paper", semantics="code").semantics == "code"
    assert VAR.from_preset("paper", exclude_last=False).exclude_last is False
    # Lucid's own design is opt-in and labelled
    assert parse_method("paint:heads=sensitive").label == "paint:heads=sensitive"
    assert "Lucid's" in next(p for p in describe_params("paint") if p["name"] == "heads")["help"]


def describe_params(name):
    return next(r for r in describe() if r["name"] == name)["params"]


def test_presets_in_the_schema_and_listing():
    for name in ("pai", "paint", "vhr", "var"):
        sch = schema(name)
        assert set(sch["x-presets"]) == {"official", "paper"}
        assert sch["properties"]["preset"]["enum"] == ["official", "paper"]
        for p in sch["x-presets"].values():
            assert set(p["values"]) == set(sch["properties"]) - {"preset"} and p["source"]


def test_layer_rules_at_both_depths():
    # PAI / paint: the papers' 2..31 of 32; the testbed's 1..5 of 6
    assert first_edited_layer(32) == 2 and first_edited_layer(6) == 1
    # VHR: the second layer and the last 14 of 32; 1 and the last 3 of 6
    assert vhr_layers(32) == [1, *range(18, 32)]
    assert vhr_layers(6) == [1, 3, 4, 5]
    # VAR's tau: the paper's 20 at D = 4096, the same fraction of sqrt(D) elsewhere
    assert default_tau(4096) == 20.0 and default_tau(128) == pytest.approx(20 / 32**0.5)


def test_sweep_grids_parse_and_render():
    from evals.sweep import GRIDS, parse_config, summarise, to_markdown

    for grid in GRIDS.values():
        for config in grid:
            parse_config(config)
    assert parse_config("baseline") == () and [m.name for m in parse_config("vhr+pai:gamma=1")] == ["vhr", "pai"]
    pope = {"accuracy": 0.9, "f1": 0.8, "precision": 0.7, "yes_ratio": 0.6, "n": 10}
    metrics = {
        **{f"pope_{s}": pope for s in ("random", "popular", "adversarial")},
        "partner_absent": {"false_yes_rate": 0.25, "n": 4},
        "caption": {
            "chair_i": 0.1,
            "chair_s": 0.2,
            "recall": 0.9,
            "mean_length_words": 12.0,
            "partner_absent_named": 0.5,
        },
    }
    row = {"config": "pai", "methods": [], "seconds": 1.0, **summarise(metrics)}
    md = to_markdown([row])
    assert (
        "| pai | 0.900 / 0.800 | 0.900 / 0.800 | 0.900 / 0.800 | 0.600 | 0.250 | 0.100 | 0.200 | 0.900 | 12.0 | 1.0 |"
        in md
    )


def test_sweep_chooses_best_admissible_setting_per_method():
    from evals.sweep import BASELINE, admissible, choose_best

    def row(config, fy, chair, acc=0.97, recall=0.9):
        return {
            "config": config,
            "partner_absent_false_yes": fy,
            "caption": {"chair_i": chair, "recall": recall},
            "pope_random": {"accuracy": acc},
        }

    base = row(BASELINE, 0.8, 0.10)
    rows = [
        base,
        row("pai", 0.7, 0.10),  # objective 0.125
        row("pai:alpha=1", 0.4, 0.05, acc=0.90),  # best cut but POPE-random drops 7 points: not admissible
        row("pai:alpha=0.2", 0.6, 0.09),  # 0.25 + 0.1: the best admissible
        row("vhr", 0.8, 0.12),  # worse than baseline, the only vhr row: still chosen (defaults)
        row("vhr+pai", 0.1, 0.01),  # compositions are not candidates
    ]
    assert not admissible(rows[2], base) and admissible(rows[3], base)
    assert not admissible(row("x", 0.1, 0.01, recall=0.88), base)
    assert choose_best(rows) == {"pai": "pai:alpha=0.2", "vhr": "vhr"}
