"""VL-SAM (`grounding.vlsam`, `lucid segment --all` / `--method vl-sam`, REST `"method": "vl-sam"`, `"all"`):
head aggregation, the causal-collapse correction and the attention flow against a naive full-matrix
computation (hand-built tensors, and every layer of the embedded model held at once), the full attention
the recorder hands over against the recorder's own image-attention rows, object names and their tokens,
the point rule, the refinement's SAM calls, NMS, pixels of crops and non-square images, the CLI and REST
answers, and bad input (one `lucid: error:` line, exit 2; a 400 naming the field)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import lucid as run_lucid
from PIL import Image
from uvicorn_server import app_client

from grounding.vlsam import (
    AttentionFlow,
    VlsamParams,
    aggregate_heads,
    answer_ids,
    column_factors,
    flow_recorder,
    head_weights,
    map_points,
    mask_nms,
    object_maps,
    parse_objects,
    parse_vlsam,
    refine,
    segment_vlsam,
    teacher_forced_flow,
    token_spans,
    views,
)

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "testbed" / "examples" / "scene.png"
Q = "the red circle"
SINGLE = VlsamParams(multiscale=False, questions=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def causal_softmax(rng, h, n):
    z = rng.normal(size=(h, n, n)) * 2
    z[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------ hand-built tensors


def test_head_weights_are_the_mean_over_queries_of_the_max_over_keys():
    n = 4
    one_hot = np.eye(n)  # every row attends to itself: max 1 -> weight 1
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # row i: 1 / (i + 1) on i + 1 keys
    probs = torch.tensor(np.stack([one_hot, uniform]))
    w = head_weights(probs)
    assert torch.allclose(w, torch.tensor([1.0, np.mean([1, 1 / 2, 1 / 3, 1 / 4])], dtype=w.dtype))
    s = aggregate_heads(probs)
    want = (1.0 * one_hot + float(w[1]) * uniform) / 2
    assert np.allclose(s.numpy(), want)
    assert torch.equal(head_weights(probs, "uniform"), torch.ones(2, dtype=probs.dtype))
    assert np.allclose(aggregate_heads(probs, "uniform").numpy(), (one_hot + uniform) / 2)


def test_column_correction_is_one_minus_unmasked_length_minus_one_over_n():
    n = 6
    causal = np.tril(np.ones((n, n), dtype=bool))
    l0 = causal.sum(0)  # column j is unmasked in rows j..n-1
    assert list(l0) == [6, 5, 4, 3, 2, 1]
    f = column_factors(n, torch.float64).numpy()
    assert np.allclose(f, 1 - (l0 - 1) / n) and np.allclose(f, (np.arange(n) + 1) / n)


def naive_flow(layers: list[np.ndarray], flow: str, regularize: str, heads: str) -> np.ndarray:
    """Every layer held at once, loops over heads and layers, the formulas as written."""
    n = layers[0].shape[-1]
    eye = np.eye(n)
    col = np.array([1 - ((n - j) - 1) / n for j in range(n)])
    aggregated = []
    for probs in layers:
        w = [probs[h].max(1).mean() if heads == "meanmax" else 1.0 for h in range(probs.shape[0])]
        s = sum(w[h] * probs[h] for h in range(probs.shape[0])) / probs.shape[0]
        if regularize == "layer":
            s = s * col[None, :]
        aggregated.append(s)
    if flow == "none":
        f = sum(aggregated) / len(aggregated)
    else:
        f = np.zeros((n, n))
        for i, s in enumerate(aggregated):
            if flow == "paper":
                f = (eye + s) @ (eye + f)
            else:
                step = (eye + s) / (eye + s).sum(1, keepdims=True)
                f = step if i == 0 else step @ f
            f = f / f.sum(1, keepdims=True)
    if regularize == "final":
        f = f * col[None, :]
    return f


@pytest.mark.parametrize("flow", ["paper", "rollout", "none"])
@pytest.mark.parametrize("regularize", ["layer", "final", "none"])
@pytest.mark.parametrize("heads", ["meanmax", "uniform"])
def test_layer_by_layer_flow_equals_the_naive_full_matrix_flow(flow, regularize, heads):
    rng = np.random.default_rng(0)
    layers = [causal_softmax(rng, 3, 7) for _ in range(4)]
    acc = AttentionFlow(VlsamParams(flow=flow, regularize=regularize, head_weights=heads), dtype=torch.float64)
    for probs in layers:
        acc.add(torch.tensor(probs))
    got = acc.result().double().numpy()
    np.testing.assert_allclose(got, naive_flow(layers, flow, regularize, heads), rtol=1e-5, atol=1e-6)
    if flow != "none" and regularize != "final":
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # renormalised rows
    assert np.allclose(np.triu(got, 1), 0)  # causal: nothing flows from later tokens


def test_paper_flow_differs_from_the_plain_rollout():
    rng = np.random.default_rng(1)
    layers = [torch.tensor(causal_softmax(rng, 2, 5)) for _ in range(3)]
    out = {}
    for flow in ("paper", "rollout"):
        acc = AttentionFlow(VlsamParams(flow=flow), dtype=torch.float64)
        for p in layers:
            acc.add(p)
        out[flow] = acc.result().numpy()
    assert not np.allclose(out["paper"], out["rollout"], atol=1e-3)


def test_point_rule_largest_region_max_inside_min_outside():
    m = np.full((6, 8), 0.2)
    m[0:3, 0:3] = [[0.6, 0.7, 0.6], [0.7, 0.8, 0.7], [0.6, 0.7, 0.6]]  # 9 px above 0.5
    m[5, 7] = 1.0  # the global max, a 1-px region
    m[4, 0] = 0.0  # the global min
    m[2, 6] = np.nan  # not part of the image (and below the min once read)
    pos, neg, region = map_points(m, 0.5)
    assert pos == (1.0, 1.0) and neg == (0.0, 4.0)  # (x, y): column, row
    assert region.sum() == 9 and not region[5, 7]
    pos, neg, _ = map_points(m, 0.5, negative=False)
    assert neg is None
    # a higher threshold makes the single hot pixel the largest region (ties: the lower label)
    pos, _, region = map_points(m, 0.95)
    assert pos == (7.0, 5.0) and region.sum() == 1
    # a flat map (all 0 after min-max): its first maximum is the region, the next pixel the negative
    pos, neg, region = map_points(np.ones((3, 3)), 0.5)
    assert pos == (0.0, 0.0) and neg == (1.0, 0.0) and region.sum() == 1
    with pytest.raises(ValueError, match="no visible pixel"):
        map_points(np.full((2, 2), np.nan))


def test_mask_nms_keeps_the_best_and_drops_overlaps_above_the_threshold():
    a = np.zeros((10, 10), bool)
    a[0:5, 0:5] = True  # 25 px
    b = np.zeros_like(a)
    b[0:5, 0:4] = True  # IoU with a: 20 / 25 = 0.8
    c = np.zeros_like(a)
    c[0:5, 3:8] = True  # IoU with a: 10 / 40 = 0.25
    empty = np.zeros_like(a)
    keep = mask_nms([b, a, c, empty], [0.8, 0.9, 0.5, 0.99], 0.5)
    assert keep == [1, 2]
    assert mask_nms([b, a, c], [0.8, 0.9, 0.5], 0.8) == [1, 0, 2]  # 0.8 is not above 0.8
    assert mask_nms([a, a], [0.5, 0.5], 0.5) == [0]  # ties: the earlier


def test_object_names_and_their_spans():
    text = "The image shows a blue circle, two red squares and a green triangle."
    names = parse_objects(text)
    assert [n.label for n in names] == ["blue circle", "red square", "green triangle"]
    assert text[slice(*names[1].span)] == "red squares"
    text = "There is a dog, two cats and the red car. A very long phrase of many words."
    listed = parse_objects(text, "list")
    assert [n.label for n in listed] == ["dog", "cats", "red car"]  # 6 words are no object name
    assert text[slice(*listed[2].span)] == "red car"
    assert parse_objects("a cat and a dog", "auto")[0].label == "cat"  # no shape words: the list rule
    assert [n.label for n in parse_objects("a red circle and a red circle", "shapes")] == ["red circle"]


def test_views_are_the_whole_image_and_four_quarters():
    img = Image.new("RGB", (101, 60))
    assert views(img, False) == [("whole", (0, 0, 101, 60))]
    v = dict(views(img, True))
    assert v["top_left"] == (0, 0, 50, 30) and v["bottom_right"] == (50, 30, 101, 60)
    assert len(v) == 5


def test_presets_and_options():
    p = VlsamParams()
    assert (p.iterations, p.multiscale, p.questions, p.threshold, p.nms_iou) == (2, True, 10, 0.5, 0.5)
    assert (p.head_weights, p.flow, p.regularize, p.negative) == ("meanmax", "paper", "layer", True)
    assert parse_vlsam("vl-sam:preset=paper") == VlsamParams(preset="paper")
    q = parse_vlsam("vl-sam:iterations=1,multiscale=false,threshold=0.6,flow=rollout")
    assert q.changed() == {"iterations": 1, "multiscale": False, "threshold": 0.6, "flow": "rollout"}


@pytest.mark.parametrize(
    "spec, words",
    [
        ("vl-sam:bogus=1", "unknown option 'bogus=1'"),
        ("vl-sam:iterations", "unknown option 'iterations'"),
        ("vl-sam:iterations=3", "iterations must be 0, 1 or 2"),
        ("vl-sam:threshold=1.5", "threshold must be in (0, 1)"),
        ("vl-sam:multiscale=maybe", "multiscale must be bool"),
        ("vl-sam:flow=max", "flow must be one of paper, rollout, none"),
        ("vl-sam:preset=best", "preset must be one of official, paper"),
        ("vl-sam:refer_answer=it", "{query}"),
        ("read", "not a vl-sam spec"),
    ],
)
def test_bad_options_name_the_problem(spec, words):
    with pytest.raises(ValueError) as e:
        parse_vlsam(spec)
    assert words in str(e.value)


# ------------------------------------------------------------------------------------ the real model


def full_attention(vlm, inputs, ids, image_keys: bool = False):
    """Every layer's [H, N, N] from the plain AttentionRecorder in one forward (all held at once); with
    `image_keys`, the recorder as the rest of Lucid uses it: rows on the image keys only."""
    import mitigation
    from mitigation import AttentionRecorder

    extra = torch.tensor([list(ids)], dtype=inputs.input_ids.dtype)
    full = torch.cat([inputs.input_ids, extra], 1)
    mask = torch.cat([inputs.attention_mask, torch.ones_like(extra)], 1)
    keys = full == vlm.image_token_id if image_keys else mask.bool()
    rec = AttentionRecorder(layers=None, prefill_rows="all")
    with torch.inference_mode(), mitigation.scope(recorder=rec, image_mask=keys):
        vlm.model(input_ids=full, attention_mask=mask, pixel_values=inputs.pixel_values, use_cache=False)
    return [rec.image_attention(layer)[0].double() for layer in range(vlm.n_layers)]


@pytest.mark.parametrize("which", ["testbed", "tiny"])
def test_flow_of_the_model_equals_the_naive_flow_of_its_attention(which, testbed_vlm, tiny_vlm):
    """The layer-by-layer FlowRecorder against every layer's full attention held at once and folded by
    `naive_flow`; the recorded attention is the full causal softmax (rows sum to 1), and its image
    columns are the recorder's ordinary image-attention rows. `tiny`: a random GQA LLaVA (kv heads 2)."""
    from vlm import SamplingParams, build_inputs, generate

    vlm = testbed_vlm if which == "testbed" else tiny_vlm
    img = Image.open(SCENE).convert("RGB")
    inputs = build_inputs(vlm, [img], ["Describe the image."])
    ids = list(generate(vlm, inputs, SamplingParams(max_new_tokens=12))[0].token_ids)
    assert len(ids) >= 3
    layers = full_attention(vlm, inputs, ids)
    n = inputs.input_ids.shape[1] + len(ids)
    assert layers[0].shape == (vlm.n_heads, n, n)
    for a in layers:
        np.testing.assert_allclose(a.sum(-1).numpy(), 1.0, atol=1e-5)
        assert float(a.triu(1).abs().max()) == 0.0
    img_rows = full_attention(vlm, inputs, ids, image_keys=True)
    pos = list(inputs.layouts[0].token_positions)
    for a, b in zip(layers, img_rows):
        np.testing.assert_allclose(a[:, :, pos].numpy(), b.numpy(), atol=1e-6)
    got = teacher_forced_flow(vlm, inputs, ids, VlsamParams()).double().numpy()
    want = naive_flow([a.numpy() for a in layers], "paper", "layer", "meanmax")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_flow_recorder_folds_each_layer_and_keeps_none():
    rec = flow_recorder(VlsamParams(flow="rollout"))
    rng = np.random.default_rng(2)
    for layer in range(3):
        rec.add_attention(layer, torch.tensor(causal_softmax(rng, 2, 5))[None].float())
    assert rec.seen == [0, 1, 2] and rec.attention == {} and rec.flow.layers == 3
    with pytest.raises(RuntimeError, match="out of order"):
        rec.add_attention(5, torch.zeros(1, 2, 5, 5))


def test_answer_ids_are_the_generated_tokens(testbed_vlm):
    """The teacher-forced referring answer is tokenized as the model writes it: its own answer, retyped,
    gives back the generated ids; token spans cover the decoded text."""
    from vlm import SamplingParams, build_inputs, generate

    img = Image.open(SCENE).convert("RGB")
    q = "Describe the image."
    gen = generate(testbed_vlm, build_inputs(testbed_vlm, [img], [q]), SamplingParams(max_new_tokens=40))[0]
    assert answer_ids(testbed_vlm, q, gen.text) == list(gen.token_ids)
    text, spans = token_spans(testbed_vlm.processor.tokenizer, list(gen.token_ids))
    assert text.strip() == gen.text and spans[-1][1] == len(text)


def test_object_maps_are_the_flow_rows_of_the_named_words(testbed_vlm):
    """Open-ended: one map per name the model wrote, from the rows of that name's tokens; referring: the
    query's words in the teacher-forced answer; `row=predict` takes the rows one before. Each map is
    the grid painted through the layout (bilinear), min-max over the visible pixels."""
    from vlm import build_inputs

    img = Image.open(SCENE).convert("RGB")
    maps = object_maps(testbed_vlm, img, None, SINGLE)
    assert [m.label for m in maps] == [n.label for n in parse_objects(maps[0].answer)]
    assert len(maps) >= 2 and all(m.scale == "whole" and m.offset == (0, 0) for m in maps)
    inputs = build_inputs(testbed_vlm, [img], [SINGLE.prompt])
    T0 = inputs.input_ids.shape[1]
    ids = answer_ids(testbed_vlm, SINGLE.prompt, maps[0].answer.strip())
    flow = teacher_forced_flow(testbed_vlm, inputs, ids, SINGLE)
    tok = testbed_vlm.processor.tokenizer
    for m in maps:
        words = tok.decode([ids[p - T0] for p in m.positions]).strip()
        assert words == m.label  # "blue circle": the colour and the shape token
        lay = m.layout
        row = flow[list(m.positions)].mean(0)[list(lay.token_positions)].reshape(lay.grid).double().numpy()
        want = (row - row.min()) / (row.max() - row.min())
        np.testing.assert_allclose(m.grid, want, atol=1e-5)
        painted = lay.to_original_map(m.grid, "bilinear")
        np.testing.assert_allclose(m.pixels, (painted - painted.min()) / (painted.max() - painted.min()), atol=1e-9)
    (ref,) = object_maps(testbed_vlm, img, Q, SINGLE)
    assert ref.label == Q and ref.answer.strip() == "The image shows the red circle."
    (pred,) = object_maps(testbed_vlm, img, Q, VlsamParams(multiscale=False, row="predict"))
    assert pred.positions == tuple(p - 1 for p in ref.positions)


def test_non_square_image_and_quarters_map_into_their_pixels(testbed_vlm):
    """A 200x100 image (the processor centre-crops it): the whole view's map is NaN outside the crop;
    each quarter's map has the quarter's size and its offset; candidates land inside their quarter."""
    from grounding.sam import image_array, load_segmenter

    img = Image.open(SCENE).convert("RGB").resize((200, 100))
    maps = object_maps(testbed_vlm, img, Q, VlsamParams(questions=1))
    by = {m.scale: m for m in maps}
    assert set(by) == {"whole", "top_left", "top_right", "bottom_left", "bottom_right"}
    assert by["whole"].pixels.shape == (100, 200)
    assert np.isnan(by["whole"].pixels[:, :50]).all() and not np.isnan(by["whole"].pixels[:, 50:150]).any()
    assert by["bottom_right"].offset == (100, 50) and by["bottom_right"].pixels.shape == (50, 100)
    cands = refine(load_segmenter("testbed"), image_array(img), maps, VlsamParams())
    for m, c in zip(maps, cands):
        x0, y0 = m.offset
        h, w = m.pixels.shape
        assert c.mask.shape == (100, 200)
        ys, xs = np.nonzero(c.mask)
        assert ((xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)).all()
        assert all(x0 <= x < x0 + w and y0 <= y < y0 + h for x, y, _ in c.points)


def test_refinement_is_sam_with_the_mask_fed_back_then_points_on_attention_times_mask(testbed_vlm):
    """iterations=0: SAM on (max inside, min outside), best of 3; 1: the same points with that mask's
    low-res logits; 2: points re-sampled on attention x mask, the previous logits again."""
    from grounding.sam import SamPrompt, image_array, load_segmenter

    seg = load_segmenter("testbed")
    img = Image.open(SCENE).convert("RGB")
    arr = image_array(img)
    (m,) = object_maps(testbed_vlm, img, Q, SINGLE)
    pos, neg, _ = map_points(m.pixels, 0.5)
    r0 = seg.segment(arr, [SamPrompt((pos, neg), (1, 0), multimask=True)])[0]
    r1 = seg.segment(arr, [SamPrompt((pos, neg), (1, 0), mask_input=r0.low_res[r0.best], multimask=False)])[0]
    gated = np.where(r1.masks[0], m.pixels, 0.0)
    pos2, _, region = map_points(gated, 0.5, False)
    outside = ~r1.masks[0] & ~region
    ny, nx = np.unravel_index(int(np.argmin(np.where(outside, m.pixels, np.inf))), m.pixels.shape)
    r2 = seg.segment(arr, [SamPrompt((pos2, (nx, ny)), (1, 0), mask_input=r1.low_res[0], multimask=False)])[0]
    for it, want, pts in [(0, r0.mask, (pos, neg)), (1, r1.masks[0], (pos, neg)), (2, r2.masks[0], (pos2, (nx, ny)))]:
        (c,) = refine(seg, arr, [m], VlsamParams(multiscale=False, iterations=it))
        assert np.array_equal(c.mask, want), it
        assert [p[:2] for p in c.points] == [tuple(map(float, p)) for p in pts]
    assert r1.masks[0][int(pos2[1]), int(pos2[0])]  # the re-sampled positive lies on the mask


def test_segment_vlsam_open_ended_and_referring(testbed_vlm):
    from grounding.sam import load_segmenter
    from grounding.scoring import mask_iou

    seg = load_segmenter("testbed")
    img = Image.open(SCENE).convert("RGB")
    objects, timings = segment_vlsam(testbed_vlm, seg, img, None, VlsamParams())
    assert objects and {"vlsam_maps_s", "sam_s"} <= set(timings)
    assert [o.score for o in objects] == sorted((o.score for o in objects), reverse=True)
    for a in objects:
        assert a.scale in ("whole", "top_left", "top_right", "bottom_left", "bottom_right") and a.question
        assert a.mask.shape == (192, 192) and a.points[0][2] == 1
        for b in objects:
            assert a is b or mask_iou(a.mask, b.mask) <= 0.5  # NMS over every candidate
    questions = {o.question for o in objects}
    assert questions <= {
        "Describe the image.",
        "Briefly describe the image.",
        "What does the image show?",
        "Describe this image.",
    }
    (ref,), _ = segment_vlsam(testbed_vlm, seg, img, Q, SINGLE)
    assert ref.label == Q and ref.scale == "whole"
    j = ref.to_json()
    assert j["source"] == "vl-sam" and j["question"] == "Describe the image." and j["mask"]["size"] == [192, 192]


# ------------------------------------------------------------------------------------ CLI and REST


def lucid(*args: str) -> subprocess.CompletedProcess:
    return run_lucid(*args, env_extra={"OMP_NUM_THREADS": "1"})


def test_cli_segment_all_json(tmp_path, testbed_vlm):
    from grounding.sam import load_segmenter
    from grounding.segment import decode_rle

    out = tmp_path / "overlay.png"
    proc = lucid("segment", str(SCENE), "--all", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    torch.set_num_threads(1)
    ref, _ = segment_vlsam(testbed_vlm, load_segmenter("testbed"), Image.open(SCENE).convert("RGB"))
    assert [o["label"] for o in data["objects"]] == [o.label for o in ref]
    for o, r in zip(data["objects"], ref):
        assert o["source"] == "vl-sam" and np.array_equal(decode_rle(o["mask"]), r.mask)
        assert o["scale"] == r.scale and o["question"] == r.question and o["box"] == [round(v, 2) for v in r.box]
    assert data["vl_sam"]["mode"] == "all" and data["vl_sam"]["params"]["iterations"] == 2
    assert all(a["answer"] for a in data["vl_sam"]["answers"])
    assert {"vlsam_maps_s", "sam_s", "load_model_s"} <= set(data["timings"])
    assert out.stat().st_size > 0


def test_cli_segment_method_vlsam_text():
    proc = lucid("segment", str(SCENE), Q, "--method", "vl-sam:multiscale=false")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith(f"{Q}: box [") and "from vl-sam, whole" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        ([str(SCENE), Q, "--method", "vl-sam:bogus=1"], "unknown option 'bogus=1'"),
        ([str(SCENE), "--all", "--method", "vl-sam:iterations=5"], "iterations must be 0, 1 or 2"),
        ([str(SCENE), "--all", "--method", "read"], "--all needs --method vl-sam"),
        ([str(SCENE), Q, "--all"], "give no QUERY"),
        ([str(SCENE), "--all", "--point", "3,3"], "give no QUERY"),
        ([str(SCENE), "--method", "vl-sam"], "nothing to segment"),
        ([str(SCENE), "--point", "3,3", "--method", "vl-sam"], "needs a text QUERY or --all"),
        ([str(SCENE), Q, "--method", "vl-sam", "--prompt", "box"], "belong to --method heads"),
        ([str(SCENE), Q, "--method", "sam-vl"], "'vl-sam[:k=v,...]'"),
        (["missing.png", "--all"], "missing.png"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    proc = lucid("segment", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lucid: error:"), proc.stderr
    assert needle in lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["segment", str(SCENE), "--all", "--method", "vl-sam:flow=max"],
        ["segment", str(SCENE), Q, "--method", "vl-sam:threshold=2"],
        ["testbed", "eval-sam", "--vl-sam-all", "vl-sam:x=1"],
    ],
)
def test_bad_specs_are_reported_before_torch_is_imported(tmp_path, args):
    marker = tmp_path / "torch-imported"
    probe = (
        "import sys, atexit\nmarker = sys.argv.pop(1)\n"
        "atexit.register(lambda: open(marker, 'w').write(str('torch' in sys.modules)))\n"
        "from lucid.cli import main\nmain()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(marker), *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 2 and proc.stderr.startswith("lucid: error:"), proc.stderr
    assert marker.read_text() == "False"


def test_cli_eval_sam_bad_vlsam_spec():
    for flag in ("--vl-sam", "--vl-sam-all"):
        proc = lucid("testbed", "eval-sam", flag, "vl-sam:nope=1")
        assert proc.returncode == 2 and proc.stderr.strip().startswith(f"lucid: error: {flag} vl-sam: unknown")


def test_eval_sam_scores_vlsam(testbed_vlm):
    """The measurement functions run and score a perfect-name world consistently on a few items."""
    from grounding.sam import load_segmenter
    from testbed.studies.sam_eval import average_precision, vlsam_open_ended, vlsam_to_sam

    assert average_precision([(0.9, True), (0.8, False), (0.7, True)], 2) == pytest.approx(
        (51 * 1.0 + 50 * (2 / 3)) / 101
    )
    # the precision envelope: a false positive first costs nothing once later precision is higher
    assert average_precision([(0.9, False), (0.8, True), (0.7, True)], 2) == pytest.approx(2 / 3)
    assert average_precision([], 3) == 0.0 and np.isnan(average_precision([], 0))
    seg = load_segmenter("testbed")
    spec = "vl-sam:multiscale=false"
    r = vlsam_to_sam(testbed_vlm, seg, [spec], n_scenes=3, n_foreign=1, progress=False)
    assert r[spec]["heldout"]["items"] >= 3 and 0 <= r[spec]["heldout"]["miou"] <= 1
    o = vlsam_open_ended(testbed_vlm, seg, [spec + ",questions=1"], n_scenes=3, progress=False)
    row = o[spec + ",questions=1"]
    assert 0 <= row["mask_ap50"] <= 1 and 0 <= row["named_absent"] <= 1 and row["s_per_image"] > 0


@pytest.fixture(scope="module")
def client():
    return app_client()


def test_rest_segment_vlsam_is_the_librarys(client):
    import base64

    from grounding.segment import decode_rle

    c, backend = client
    torch.set_num_threads(1)
    url = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
    img = np.asarray(Image.open(SCENE).convert("RGB"))
    vlm, seg = backend.vlm.engine.vlm, backend.sam.segmenter
    for body, query, spec in [
        ({"all": True, "method": "vl-sam"}, None, "vl-sam"),
        ({"all": True}, None, "vl-sam"),  # the default method reads as vl-sam
        ({"query": Q, "method": "vl-sam"}, Q, "vl-sam"),  # 5 views' candidates, the best one kept
    ]:
        r = c.post("/v1/segment", json={"image": url, **body})
        assert r.status_code == 200, r.text
        j = r.json()
        ref, _ = segment_vlsam(vlm, seg, img, query, parse_vlsam(spec))
        assert [o["label"] for o in j["objects"]] == [o.label for o in ref] and len(ref) == (1 if query else len(ref))
        assert j["vl_sam"]["maps"] >= (5 if query else 1)
        for o, want in zip(j["objects"], ref):
            assert o["source"] == "vl-sam" and np.array_equal(decode_rle(o["mask"]), want.mask)
            assert [tuple(p) for p in o["points"]] == [(round(x, 2), round(y, 2), lab) for x, y, lab in want.points]
        assert j["vl_sam"]["mode"] == ("all" if query is None else "query") and j["image_size"] == [192, 192]
        assert {"vlsam_maps_s", "sam_s", "wall_s"} <= set(j["timings"])
    for body, words, param in [
        ({"all": True, "method": "vl-sam:bogus=1"}, "unknown option", "method"),
        ({"all": True, "method": "read"}, "all needs method", "method"),
        ({"all": True, "query": Q}, "give no query", "all"),
        ({"query": Q, "method": "vl-sam:iterations=9"}, "iterations must be", "method"),
        ({"query": Q, "method": "vl-sam", "prompt": "box"}, "prompt belongs", "prompt"),
    ]:
        r = c.post("/v1/segment", json={"image": url, **body})
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert words in e["message"] and e["param"] == param, e


def test_discovery_finds_a_second_instance_on_attention_outside_the_masks():
    """A map with two blobs (peak 1 on one object, 0.8 on another): `discover` prompts SAM on the map with
    the first object's mask removed and returns the other object; a remaining peak below `discover_peak`,
    or discover=0, finds nothing."""
    from grounding.sam import image_array, load_segmenter
    from grounding.scoring import mask_iou
    from grounding.vlsam import discover
    from testbed.world.scenes import render_scene

    scene = next(s for s in (render_scene(i) for i in range(200)) if len(s.objects) >= 2)
    a, b = scene.objects[:2]
    arr = image_array(scene.image)
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]

    def blob(o, peak):
        ys, xs = np.nonzero(o.mask)
        return peak * np.exp(-((yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2) / (2 * 6.0**2))

    pixels = np.maximum(blob(a, 1.0), blob(b, 0.8))
    seg = load_segmenter("testbed")
    found = a.mask & ~b.mask
    got = discover(seg, arr, pixels, found, VlsamParams(discover=3, multiscale=False))
    assert got, "no instance discovered"
    mask, _, pts = got[0]
    assert pts[0][2] == 1 and b.mask[int(pts[0][1]), int(pts[0][0])]  # the positive lies on the other object
    assert mask_iou(mask, b.mask) > mask_iou(mask, a.mask)
    assert discover(seg, arr, pixels, found, VlsamParams(discover=3, discover_peak=0.9)) == []
    assert discover(seg, arr, pixels, found, VlsamParams(discover=0)) == []
    with pytest.raises(ValueError, match="discover must be >= 0"):
        VlsamParams(discover=-1)
