"""Localization-head discovery: spatial entropy, the elbow rule, phrase positions, the cache, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import grounding.heads as heads_mod
from grounding import (
    HeadParams,
    HeadSelection,
    calibration_from_folder,
    calibration_from_testbed,
    discover_heads,
    elbow_threshold,
    explicit_selection,
    load_or_discover,
    parse_heads,
    spatial_entropy,
)
from grounding.maps import connected_components, gaussian_smooth, upsample_bilinear
from grounding.readout import phrase_positions, render_prompt
from vlm import build_inputs

CAL_SCENES = 8  # small calibration sets keep the tests fast


def test_spatial_entropy_hand_computed():
    one_blob = np.zeros((6, 6))
    one_blob[1:3, 1:3] = 1.0
    assert spatial_entropy(one_blob) == 0.0

    two_equal = np.zeros((6, 6))
    two_equal[0, 0] = two_equal[5, 5] = 1.0
    assert spatial_entropy(two_equal) == pytest.approx(math.log(2))

    # blobs of 3 and 1 cells: -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335
    three_one = np.zeros((6, 6))
    three_one[0, 0:3] = 1.0
    three_one[4, 4] = 1.0
    assert spatial_entropy(three_one) == pytest.approx(0.5623351446, abs=1e-9)

    # binarization is at the mean: a low background plateau does not count
    lifted = three_one + 0.01
    assert spatial_entropy(lifted) == pytest.approx(0.5623351446, abs=1e-9)

    # diagonal neighbours: one component with 8-connectivity, two with 4
    diag = np.zeros((4, 4))
    diag[1, 1] = diag[2, 2] = 1.0
    assert spatial_entropy(diag, connectivity=8) == 0.0
    assert spatial_entropy(diag, connectivity=4) == pytest.approx(math.log(2))

    assert spatial_entropy(np.full((4, 4), 0.5)) == math.inf  # nothing above the mean


def test_connected_components_labels_in_row_major_order():
    m = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 0, 1],
            [0, 0, 0, 1, 0],
            [1, 0, 1, 1, 0],
        ],
        dtype=bool,
    )
    labels8, n8 = connected_components(m, 8)
    assert n8 == 3
    assert labels8[0, 0] == labels8[1, 1] == 1 and labels8[0, 4] == labels8[3, 2] == 2 and labels8[3, 0] == 3
    _, n4 = connected_components(m, 4)
    assert n4 == 4  # (2, 3) touches (1, 4) only diagonally
    serpentine = np.zeros((15, 15), dtype=bool)
    serpentine[0::2] = True  # full even rows, joined at alternating ends: one path of ~120 cells
    serpentine[1::4, -1] = True
    serpentine[3::4, 0] = True
    labels, n = connected_components(serpentine, 4)
    assert n == 1 and labels[14, 0] == 1  # propagation must run all the way along the path


def test_smoothing_and_upsampling_keep_mass_and_centre():
    g = np.zeros((9, 9))
    g[4, 4] = 1.0
    s = gaussian_smooth(g, 1.0)
    assert s.sum() == pytest.approx(1.0, abs=1e-9) and np.unravel_index(s.argmax(), s.shape) == (4, 4)
    assert s[4, 3] == pytest.approx(s[4, 5]) and s[3, 4] == pytest.approx(s[5, 4])
    up = upsample_bilinear(np.arange(4.0).reshape(2, 2), 2)
    assert up.shape == (4, 4)
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0])  # sub-cell centres 0.25 cell from cell centres


def test_elbow_rule_on_a_hand_built_curve():
    # 20 heads barely look at the image, 4 look a lot: the elbow is the last flat point
    values = [0.010 + 0.0005 * i for i in range(20)] + [0.30, 0.50, 0.60, 0.65]
    thr = elbow_threshold(values, "chord")
    assert thr == pytest.approx(0.0195)
    assert [v for v in values if v > thr] == [0.30, 0.50, 0.60, 0.65]
    assert elbow_threshold(values, "mean") == pytest.approx(float(np.mean(values)))
    assert elbow_threshold(values, "none") == -math.inf
    with pytest.raises(ValueError, match="elbow"):
        elbow_threshold(values, "knee")


def test_render_prompt_and_its_errors():
    assert render_prompt("Where is {query}?", "the red circle") == ("Where is the red circle?", (9, 23))
    q, (a, b) = render_prompt("Is there a {noun} in the image?", "the red circle")
    assert q == "Is there a red circle in the image?" and q[a:b] == "red circle"
    with pytest.raises(ValueError, match="exactly one"):
        render_prompt("Where is it?", "the red circle")
    with pytest.raises(ValueError, match="non-empty"):
        render_prompt("{query}", "  ")
    assert parse_heads("3:1, 0:2") == ((3, 1), (0, 2))
    with pytest.raises(ValueError, match="L:H"):
        parse_heads("3-1")


def test_phrase_positions_in_a_left_padded_batch(testbed_vlm):
    from testbed.world.scenes import WorldConfig, scenes

    imgs = [s.image for s in scenes(3, 2, WorldConfig())]
    qs = [render_prompt("Where is {query}?", "the yellow triangle"), render_prompt("{query}", "the red circle")]
    inputs = build_inputs(testbed_vlm, imgs, [q for q, _ in qs])
    assert inputs.attention_mask[1].sum() < inputs.attention_mask[0].sum()  # row 1 is left padded
    tok = testbed_vlm.processor.tokenizer
    for b, (q, span) in enumerate(qs):
        pos = phrase_positions(testbed_vlm, inputs.input_ids[b], q, span)
        assert list(pos) == list(range(pos[0], pos[-1] + 1))
        assert tok.decode(inputs.input_ids[b, list(pos)]).strip() == q[span[0] : span[1]]


def test_discovery_is_deterministic_and_round_trips(testbed_vlm, tmp_path):
    cal = calibration_from_testbed(4242, CAL_SCENES)
    params = HeadParams(prompt="Where is {query}?", rows="query")
    a = discover_heads(testbed_vlm, cal, params, batch_size=8, cache_dir=tmp_path)
    b = discover_heads(testbed_vlm, cal, params, batch_size=8, cache_dir=tmp_path)
    assert a.to_json() == b.to_json()
    assert len(a.heads) == 3 and len(set(a.heads)) == 3
    assert len(a.scores) == testbed_vlm.n_layers * testbed_vlm.n_heads
    freq = {(s.layer, s.head): s.frequency for s in a.scores}
    assert sum(freq.values()) == pytest.approx(params.per_sample_k(6, 4))  # k picks per sample
    assert min(freq[h] for h in a.heads) >= max(v for k, v in freq.items() if k not in a.heads)
    assert a.n_samples == len(cal) and a.calibration == cal.name and a.params == params
    again = HeadSelection.from_json(json.loads(json.dumps(a.to_json())))
    assert again.to_json() == a.to_json()


def test_cache_keyed_by_weights_hash_reused_and_overridable(testbed_vlm, tmp_path, monkeypatch):
    monkeypatch.setenv("LUCID_CACHE", str(tmp_path))
    cal = calibration_from_testbed(4242, CAL_SCENES)
    params = HeadParams()
    first = load_or_discover(testbed_vlm, cal, params)
    files = list((tmp_path / "heads").glob("*.json"))
    assert len(files) == 1
    digest = testbed_vlm.weights_hash()
    assert first.weights_hash == digest and files[0].name.startswith(digest[:16])
    mtime = files[0].stat().st_mtime_ns

    def no_rediscovery(*args, **kwargs):
        raise AssertionError("the cached selection should have been used")

    monkeypatch.setattr(heads_mod, "discover_heads", no_rediscovery)
    second = load_or_discover(testbed_vlm, cal, params)
    assert second.to_json() == first.to_json()
    assert files[0].stat().st_mtime_ns == mtime
    # another weights hash is another key
    assert heads_mod.cache_path("0" * 64, params, cal.name) != files[0]
    # explicit heads override: no discovery, no cache file
    explicit = load_or_discover(testbed_vlm, cal, params, heads=[(5, 3), (0, 0)])
    assert explicit.heads == ((5, 3), (0, 0)) and explicit.calibration == "explicit"
    assert len(list((tmp_path / "heads").glob("*.json"))) == 1
    with pytest.raises(ValueError, match="outside the model"):
        explicit_selection(testbed_vlm, [(6, 0)])


def test_embedded_model_ships_its_selection(testbed_vlm, tmp_path, monkeypatch):
    """The default selection of the embedded model is shipped beside its weights (`lucid_heads.json`): a
    fresh cache gets it without discovery, and it is the one discovery makes (checked in
    test_discovery_is_deterministic_and_round_trips for the paper's params; here the shipped file's key)."""
    monkeypatch.setenv("LUCID_CACHE", str(tmp_path))

    def no_discovery(*args, **kwargs):
        raise AssertionError("the shipped selection should have been used")

    monkeypatch.setattr(heads_mod, "discover_heads", no_discovery)
    sel = load_or_discover(testbed_vlm)
    assert sel.weights_hash == testbed_vlm.weights_hash() and len(sel.heads) == sel.params.n_heads
    assert len(list((tmp_path / "heads").glob("*.json"))) == 1  # and now cached
    with pytest.raises(AssertionError, match="shipped"):  # other params are not served by the shipped file
        load_or_discover(testbed_vlm, params=HeadParams())


def test_calibration_from_folder_format(tmp_path):
    from testbed.world.scenes import WorldConfig, scenes

    s = next(iter(scenes(5, 1, WorldConfig())))
    (tmp_path / "imgs").mkdir()
    s.image.save(tmp_path / "imgs" / "a.png")
    f = tmp_path / "cal.jsonl"
    f.write_text(json.dumps({"image": "imgs/a.png", "phrase": "the thing"}) + "\n\n")
    cal = calibration_from_folder(f)
    assert len(cal) == 1 and cal.samples[0].phrase == "the thing" and cal.name.startswith("folder:")
    f.write_text(json.dumps({"image": "imgs/missing.png", "phrase": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        calibration_from_folder(f)
    f.write_text(json.dumps({"img": "imgs/a.png"}) + "\n")
    with pytest.raises(ValueError, match="expected"):
        calibration_from_folder(f)
