"""READ's similarity-as-points (`grounding.read`, `lucid segment --method read`, REST `"method": "read"`):
the point rule on hand-built maps (normalisation, thresholds, order, cap, downsampling, pixels through a
padded non-square layout, DtoC), the similarity against transformers' own `output_hidden_states` on the
embedded testbed model (last, target, a middle layer, a generated segmentation token), the CLI and REST
answers, and bad input (one `lucid: error:` line, exit 2; a 400 naming the field)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import lucid as run_lucid
from PIL import Image
from uvicorn_server import app_client

from grounding.read import ReadParams, dtoc, parse_read, read_batch, segment_read, similarity_points
from vlm.layout import ImageView, clip_geometry, pad_geometry

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "testbed" / "examples" / "scene.png"
Q = "the red circle"


def identity_view(rows: int = 4, cols: int = 4, p: int = 8) -> ImageView:
    """Grid cells of p px on an original image of exactly the processed size (no resize, no crop)."""
    geo = clip_geometry((cols * p, rows * p), None, (rows * p, cols * p), None)
    return ImageView(tuple(range(rows * cols)), (rows, cols), p, geo)


# ------------------------------------------------------------------------------------ the point rule


def test_thresholds_order_labels_and_pixels_by_hand():
    """Min-max to [0, 1]; >= 0.8 positive (descending), <= 0.2 negative (ascending), the rest neutral in
    raster order; cell (r, c) of an 8-px grid -> pixel ((c + 0.5) * 8, (r + 0.5) * 8) truncated."""
    sim = np.array([[10.0, 9.0, 5.0, 5.0], [5.0, 5.0, 5.0, 1.0], [5.0, 0.0, 5.0, 5.0], [5.0, 5.0, 5.0, 8.5]])
    # normalised: 10 -> 1, 9 -> 0.9, 8.5 -> 0.85, 5 -> 0.5, 1 -> 0.1, 0 -> 0
    sas = similarity_points(sim, identity_view(), ReadParams(down_sample=1, dtoc=False))
    assert np.allclose(sas.cells, sim / 10.0)
    labels = [lab for *_, lab in sas.points]
    assert labels[:5] == [1, 1, 1, 0, 0] and set(labels[5:]) == {-1} and len(sas.points) == 16
    assert sas.cell_index[:5] == ((0, 0), (0, 1), (3, 3), (2, 1), (1, 3))
    assert sas.cell_index[5:8] == ((0, 2), (0, 3), (1, 0))  # neutrals in raster order
    assert sas.points[0] == (4.0, 4.0, 1) and sas.points[2] == (28.0, 28.0, 1) and sas.points[3] == (12.0, 20.0, 0)
    pts, labs = sas.sam_points()
    assert labs == (1, 1, 1, 0, 0) and pts[1] == (12.0, 4.0)  # neutrals are not sent to SAM


def test_cap_keeps_positives_then_negatives_then_neutrals():
    sim = np.arange(16, dtype=float).reshape(4, 4)  # normalised k / 15
    sas = similarity_points(sim, identity_view(), ReadParams(down_sample=1, dtoc=False, num_points=5))
    # positives: k >= 12 (12/15 = 0.8), descending; then the smallest negatives 0, 1 (k <= 3)
    assert [r * 4 + c for r, c in sas.cell_index] == [15, 14, 13, 12, 0]
    assert [lab for *_, lab in sas.points] == [1, 1, 1, 1, 0]


def test_downsampling_is_bilinear_by_the_factor():
    """Bilinear downsampling by 2 (align_corners=False) samples between 4 cells: the mean of each 2x2
    block, then min-max; downsampled cell (r, c) -> pixel ((c + 0.5) * 16, (r + 0.5) * 16)."""
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(4, 4))
    sas = similarity_points(sim, identity_view(), ReadParams(dtoc=False))
    block = sim.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    want = (block - block.min()) / (block.max() - block.min())
    assert sas.cells.shape == (2, 2) and np.allclose(sas.cells, want)
    r, c = np.unravel_index(int(np.argmax(want)), want.shape)
    assert sas.points[0] == ((c + 0.5) * 16, (r + 0.5) * 16, 1)


def test_padded_non_square_layout_excludes_padding_and_maps_to_original_pixels():
    """A 64x32 image padded to 64x64 and resized to 32 px, patch 8: grid rows 0 and 3 are padding.
    Cell (r, c) centre: processed ((c + .5) 8, (r + .5) 8) -> original (16 c + 8, 16 r - 8). The
    padding cells hold the global extremes, yet neither count in the min-max nor become points."""
    geo = pad_geometry((64, 32), 32, None, None)
    view = ImageView(tuple(range(16)), (4, 4), 8, geo)
    sim = np.full((4, 4), 5.0)
    sim[0, :] = 100.0  # padding
    sim[3, :] = -100.0  # padding
    sim[1, 2], sim[2, 0] = 9.0, 1.0  # the image's own extremes
    sas = similarity_points(sim, view, ReadParams(down_sample=1, dtoc=False))
    assert np.isnan(sas.cells[[0, 3]]).all()
    assert sas.cells[1, 2] == 1.0 and sas.cells[2, 0] == 0.0 and sas.cells[1, 0] == 0.5
    assert sas.points[0] == (40.0, 8.0, 1) and sas.points[1] == (8.0, 24.0, 0)
    assert len(sas.points) == 8 and all(0 <= x < 64 and 0 <= y < 32 for x, y, _ in sas.points)


def test_center_crop_pixels_are_the_layouts_cell_centres():
    """The testbed's processor on a 200x100 image (shortest edge 96, centre crop 96): each point is the
    pixel under `ImageView.cell_center` (the processor's inverse), not a re-derived mapping."""
    geo = clip_geometry((200, 100), 96, None, (96, 96))
    view = ImageView(tuple(range(144)), (12, 12), 8, geo)
    sim = np.random.default_rng(1).normal(size=(12, 12))
    sas = similarity_points(sim, view, ReadParams(down_sample=1, dtoc=False, num_points=144))
    for (r, c), (x, y, _) in zip(sas.cell_index, sas.points):
        cx, cy = view.cell_center(r, c)
        assert (x, y) == (float(int(cx)), float(int(cy)))
    assert min(x for x, *_ in sas.points) >= 50  # the crop starts at x = 48 / 0.96 = 50


def test_paper_thresholds_are_mean_plus_minus_eps_std():
    sim = np.arange(16, dtype=float).reshape(4, 4)
    sas = similarity_points(sim, identity_view(), ReadParams.from_preset("paper", down_sample=1, dtoc=False))
    v = np.arange(16) / 15
    mu, sd = v.mean(), v.std()
    labels = dict(zip([r * 4 + c for r, c in sas.cell_index], [lab for *_, lab in sas.points]))
    assert {k for k, lab in labels.items() if lab == 1} == set(np.flatnonzero(v >= mu + 0.5 * sd))
    assert {k for k, lab in labels.items() if lab == 0} == set(np.flatnonzero(v <= mu - 0.5 * sd))


def test_dtoc_is_the_softmax_weighted_gaussian_mean():
    """p' = sum_i w_i g_i, w_i ~ exp(-|g_i - p|^2) softmax(M)_i over every pixel (the window is exact)."""
    rng = np.random.default_rng(2)
    full = rng.uniform(size=(40, 50))
    ys, xs = np.mgrid[0:40, 0:50]
    for x, y in [(20, 15), (0, 0), (49, 39)]:
        soft = np.exp(full) / np.exp(full).sum()
        w = np.exp(-((xs - x) ** 2 + (ys - y) ** 2)) * soft
        w /= w.sum()
        assert np.allclose(dtoc(full, x, y), ((w * xs).sum(), (w * ys).sum()), atol=1e-9)
    assert dtoc(np.zeros((9, 9)), 4, 4) == (4.0, 4.0)
    ramp = np.tile(np.arange(9.0), (9, 1))  # higher to the right: the point moves right, not up or down
    nx, ny = dtoc(ramp, 4, 4)
    assert nx > 4.1 and abs(ny - 4) < 1e-9


def test_dtoc_moves_the_points_in_similarity_points():
    sim = np.random.default_rng(3).normal(size=(4, 4))
    plain = similarity_points(sim, identity_view(), ReadParams(dtoc=False))
    moved = similarity_points(sim, identity_view(), ReadParams())
    assert plain.cell_index == moved.cell_index
    shifts = [np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(plain.points, moved.points)]
    assert max(shifts) > 1e-3 and max(shifts) < 1.5  # a sub-pixel nudge toward higher similarity


def test_presets_and_options():
    official = ReadParams()
    assert (official.t_pos, official.t_neg, official.num_points, official.down_sample) == (0.8, 0.2, 30, 2)
    assert official.dtoc and not official.multimask and official.layer == -1 and official.token == "auto"
    paper = parse_read("read:preset=paper")
    assert paper.threshold == "sigma" and paper.eps == 0.5 and paper.changed() == {}
    p = parse_read("read:token=last,layer=3,dtoc=false,t_pos=0.7")
    assert (p.token, p.layer, p.dtoc, p.t_pos) == ("last", 3, False, 0.7)
    assert p.changed() == {"token": "last", "layer": 3, "dtoc": False, "t_pos": 0.7}
    assert parse_read("read:preset=paper,eps=1").eps == 1.0


@pytest.mark.parametrize(
    "spec, words",
    [
        ("read:bogus=1", "unknown option 'bogus=1'"),
        ("read:layer", "unknown option 'layer'"),
        ("read:layer=x", "layer must be int"),
        ("read:dtoc=maybe", "dtoc must be bool"),
        ("read:token=first", "token must be one of auto, seg, target, last"),
        ("read:t_pos=0.1", "t_neg < t_pos"),
        ("read:preset=best", "preset must be one of official, paper"),
        ("read:prompt=segment it", "{query}"),
        ("heads", "not a read spec"),
    ],
)
def test_bad_options_name_the_problem(spec, words):
    with pytest.raises(ValueError, match=None) as e:
        parse_read(spec)
    assert words in str(e.value)


# ------------------------------------------------------------------------------------ the real model


def reference_hidden(vlm, inputs, extra_ids=()):
    """transformers' own hidden_states (output_hidden_states=True) for the prompt + `extra_ids`."""
    ids = torch.cat([inputs.input_ids, torch.tensor([list(extra_ids)], dtype=inputs.input_ids.dtype)], 1)
    mask = torch.cat([inputs.attention_mask, torch.ones(1, len(extra_ids), dtype=inputs.attention_mask.dtype)], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = vlm.model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=inputs.pixel_values,
            position_ids=pos,
            output_hidden_states=True,
        )
    return out.hidden_states


def ref_map(hidden, layout, rows):
    h = hidden[0].float()
    s = (h[list(layout.token_positions)] @ h[list(rows)].mean(0)).reshape(layout.grid).numpy()
    return (s - s.min()) / (s.max() - s.min())


@pytest.mark.parametrize("token, layer", [("last", -1), ("target", -1), ("target", 3), ("last", 0)])
def test_similarity_is_the_dot_product_of_transformers_hidden_states(testbed_vlm, token, layer):
    from vlm import build_inputs

    img = Image.open(SCENE).convert("RGB")
    params = ReadParams(token=token, layer=layer)
    (res,) = read_batch(testbed_vlm, [img], [Q], params)
    inputs = build_inputs(testbed_vlm, [img], [params.prompt.replace("{query}", Q)])
    hidden = reference_hidden(testbed_vlm, inputs)
    assert len(hidden) == testbed_vlm.n_layers + 1 and res.layer == layer % len(hidden)
    T = inputs.input_ids.shape[1]
    if token == "last":
        assert res.positions == (T - 1,)
    else:  # the words naming the target, without the article
        words = testbed_vlm.processor.tokenizer.decode(inputs.input_ids[0, list(res.positions)])
        assert words.strip() == "red circle"
    np.testing.assert_allclose(res.values, ref_map(hidden[layer], res.layout, res.positions), atol=1e-4)


def test_seg_token_is_the_row_predicting_it(testbed_vlm):
    """token=seg: greedy generation until `seg_token`; the state is the row whose next-token prediction
    is that token (READ's index arithmetic). A token the testbed model really generates stands in for
    `[SEG]` (no checkpoint here has one); the state is compared with a full forward over prompt + answer."""
    from vlm import SamplingParams, build_inputs, generate

    img = Image.open(SCENE).convert("RGB")
    tok = testbed_vlm.processor.tokenizer
    prompt = "Describe {query}."  # the LISA question gets a one-token answer from the testbed model
    inputs = build_inputs(testbed_vlm, [img], [prompt.replace("{query}", Q)])
    ids = list(generate(testbed_vlm, inputs, SamplingParams(max_new_tokens=8))[0].token_ids)
    assert len(ids) >= 3
    seg = tok.convert_ids_to_tokens(ids[2])
    k = ids.index(ids[2])
    assert k > 0  # a decode row, not the prompt's last
    (res,) = read_batch(testbed_vlm, [img], [Q], ReadParams(token="seg", seg_token=seg, prompt=prompt))
    T = inputs.input_ids.shape[1]
    assert res.token == "seg" and res.positions == (T - 1 + k,)
    hidden = reference_hidden(testbed_vlm, inputs, ids[:k])
    np.testing.assert_allclose(res.values, ref_map(hidden[-1], res.layout, res.positions), atol=1e-4)
    # auto: seg when the tokenizer has the token, else the last prompt token
    (auto,) = read_batch(testbed_vlm, [img], [Q], ReadParams(seg_token=seg, prompt=prompt))
    assert auto.token == "seg" and auto.positions == res.positions
    assert read_batch(testbed_vlm, [img], [Q])[0].token == "last"  # no [SEG] in the testbed's tokenizer
    with pytest.raises(ValueError, match="has no single token"):
        read_batch(testbed_vlm, [img], [Q], ReadParams(token="seg"))
    with pytest.raises(ValueError, match="did not generate"):
        read_batch(testbed_vlm, [img], [Q], ReadParams(token="seg", seg_token=seg, prompt=prompt, max_new_tokens=k))


def test_segment_read_gives_sam_the_points(testbed_vlm):
    from grounding.read import read_prompt
    from grounding.sam import SamPrompt, load_segmenter

    seg = load_segmenter("testbed")
    img = Image.open(SCENE).convert("RGB")
    (obj,), timings = segment_read(testbed_vlm, seg, img, [Q], ReadParams())
    sas = obj.location.sas
    assert obj.source == "read" and obj.mask.shape == (192, 192) and obj.mask.any()
    assert [(x, y, lab) for x, y, lab in obj.points] == [p for p in sas.points if p[2] != -1]
    assert sum(lab == 1 for *_, lab in obj.points) >= 1 and {"read_s", "sam_s"} <= set(timings)
    # the official code's multimask_output=False: SAM's single mask for those points
    prompt = read_prompt(obj.location, ReadParams())
    assert prompt.wants_multimask is False and read_prompt(obj.location, ReadParams(multimask=True)).wants_multimask
    single = seg.segment(img, [SamPrompt(prompt.points, prompt.labels, multimask=False)])[0]
    assert single.masks.shape[0] == 1 and np.array_equal(obj.mask, single.masks[0])


# ------------------------------------------------------------------------------------ CLI and REST


def lucid(*args: str) -> subprocess.CompletedProcess:
    return run_lucid(*args, env_extra={"OMP_NUM_THREADS": "1"})


def test_cli_segment_method_read_json(tmp_path):
    from grounding.segment import decode_rle

    out = tmp_path / "overlay.png"
    proc = lucid("segment", str(SCENE), Q, "--method", "read", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (o,) = data["objects"]
    assert o["source"] == "read" and o["label"] == Q and decode_rle(o["mask"]).shape == (192, 192)
    assert o["points"] and {lab for *_, lab in o["points"]} <= {0, 1} and o["points"][0][2] == 1
    assert data["read"]["token"] == "last" and data["read"]["params"]["num_points"] == 30  # auto, no [SEG]
    assert data["read"]["map"]["grid"] == [12, 12] and "heads" not in data
    assert {"read_s", "sam_s", "load_model_s"} <= set(data["timings"])
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    "args, needle",
    [
        ([str(SCENE), Q, "--method", "read:bogus=1"], "unknown option 'bogus=1'"),
        ([str(SCENE), Q, "--method", "read:num_points=0"], "num_points must be >= 1"),
        ([str(SCENE), Q, "--method", "sasp"], "--method must be 'heads' or 'read"),
        ([str(SCENE), "--point", "3,3", "--method", "read"], "needs a text QUERY"),
        ([str(SCENE), Q, "--method", "read", "--prompt", "box"], "belong to --method heads"),
        ([str(SCENE), Q, "--method", "read:layer=99"], "--method read: layer 99 is outside"),
        (["missing.png", Q, "--method", "read:layer=-8"], "layer -8 is outside"),  # config.json, before the image
        ([str(SCENE), Q, "--method", "read:token=seg"], "no single token '[SEG]'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    proc = lucid("segment", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lucid: error:"), proc.stderr
    assert needle in lines[0]


def test_cli_eval_sam_bad_read_spec():
    proc = lucid("testbed", "eval-sam", "--read", "read:nope=1")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("lucid: error: --read")


@pytest.fixture(scope="module")
def client():
    return app_client()


def test_rest_segment_method_read_is_the_librarys(client):
    import base64

    from grounding.segment import decode_rle

    c, backend = client
    url = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
    r = c.post("/v1/segment", json={"image": url, "query": Q, "method": "read:token=last"})
    assert r.status_code == 200, r.text
    j = r.json()
    (o,) = j["objects"]
    img = np.asarray(Image.open(SCENE).convert("RGB"))
    params = parse_read("read:token=last")
    (ref,), _ = segment_read(backend.vlm.engine.vlm, backend.sam.segmenter, img, [Q], params)
    assert o["source"] == "read" and np.array_equal(decode_rle(o["mask"]), ref.mask)
    assert [tuple(p) for p in o["points"]] == [(round(x, 2), round(y, 2), lab) for x, y, lab in ref.points]
    assert j["read"]["token"] == "last" and "read_s" in j["timings"] and j["image_size"] == [192, 192]
    for body, words in [
        ({"method": "read:bogus=1"}, "unknown option"),
        ({"method": "sasp"}, "method must be"),
        ({"method": "read:layer=99"}, "outside"),
        ({"method": "read", "prompt": "box"}, "prompt belongs"),
    ]:
        r = c.post("/v1/segment", json={"image": url, "query": Q, **body})
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert words in e["message"] and e["param"] in ("method", "prompt")
