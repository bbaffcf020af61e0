"""SAM in Lucid: the torchvision-free import, both backends (equal on the same weights), prompts,
coordinates, the embedding cache, batched decoding, training (resumable) and the embedded tiny SAM."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.sam import TESTBED_SAM, PromptError, SamPrompt, load_segmenter, mask_box
from grounding.sam_import import _batched_nms, _resize, import_segment_anything
from grounding.sam_model import SamArchitecture, build_sam, decode_batched
from grounding.scoring import mask_iou
from grounding.segment import decode_rle, encode_rle
from testbed.world.scenes import WorldConfig, render_scene

SMALL = SamArchitecture(
    img_size=64,
    patch_size=8,
    encoder_dim=32,
    encoder_depth=1,
    encoder_heads=2,
    prompt_dim=32,
    decoder_mlp=64,
    decoder_heads=2,
)


def test_import_leaves_no_torchvision_behind():
    code = """
import importlib.util, sys
from transformers import AutoImageProcessor
before = type(AutoImageProcessor.from_pretrained('testbed/weights/tiny-llava')).__name__
from grounding.sam_import import import_segment_anything
import grounding.sam_import as si
sa = import_segment_anything()
from transformers.utils import is_torchvision_available
after = type(AutoImageProcessor.from_pretrained('testbed/weights/tiny-llava')).__name__
print(before, after, si.mode, is_torchvision_available(), importlib.util.find_spec('torchvision') is None,
      any(n == 'torchvision' or n.startswith('torchvision.') for n in sys.modules), hasattr(sa, 'SamPredictor'))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after, mode, tv_available, no_spec, left, has_predictor = out
    assert before == after  # the LLaVA image processor did not switch backends
    if mode == "stand-in":
        assert (tv_available, no_spec, left) == ("False", "True", "False")
    assert has_predictor == "True"


def test_stand_in_resize_is_pil_bilinear_and_nms_suppresses():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(_resize(img, (20, 29))), np.asarray(img.resize((29, 20), Image.BILINEAR)))
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = _batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), 0.5)
    assert sorted(keep.tolist()) == [0, 2, 3]  # box 1 overlaps box 0 (same class); box 3 is another class


def test_decode_batched_equals_stock_predict_masks():
    torch.manual_seed(0)
    sam = build_sam(SMALL).eval()
    emb = torch.randn(2, 32, 8, 8)
    pe = sam.prompt_encoder.get_dense_pe()
    coords = torch.rand(3, 2, 2) * 64
    sparse, dense = sam.prompt_encoder(points=(coords, torch.ones(3, 2, dtype=torch.int)), boxes=None, masks=None)
    with torch.no_grad():
        ours, iou = decode_batched(sam.mask_decoder, emb[[0, 0, 1]], pe, sparse, dense)
        for i, img in enumerate([0, 0, 1]):
            ref, ref_iou = sam.mask_decoder.predict_masks(emb[img : img + 1], pe, sparse[i : i + 1], dense[i : i + 1])
            assert torch.allclose(ours[i], ref[0], atol=1e-5)
            assert torch.allclose(iou[i], ref_iou[0], atol=1e-5)


def test_prompt_validation():
    with pytest.raises(PromptError, match="at least one point or a box"):
        SamPrompt()
    with pytest.raises(PromptError, match="labels"):
        SamPrompt(((1, 2),), (1, 0))
    with pytest.raises(PromptError, match="0 or 1"):
        SamPrompt(((1, 2),), (2,))
    with pytest.raises(PromptError, match="outside the 10x8 image"):
        SamPrompt(((10, 2),), (1,)).check(10, 8)
    with pytest.raises(PromptError, match="box"):
        SamPrompt(box=(5, 1, 5, 4)).check(10, 8)
    assert SamPrompt(box=(2, 3, 7, 8)).sam_box().tolist() == [2, 3, 6, 7]  # exclusive -> SAM's inclusive corners
    assert SamPrompt(((1, 1),), (1,)).wants_multimask and not SamPrompt(((1, 1), (2, 2)), (1, 0)).wants_multimask


def test_mask_box_and_rle_round_trip():
    m = np.zeros((7, 11), bool)
    m[2:5, 3:9] = True
    assert mask_box(m) == (3.0, 2.0, 9.0, 5.0)
    rle = encode_rle(m)
    assert rle["size"] == [7, 11] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(json.loads(json.dumps(rle))), m)


@pytest.fixture(scope="module")
def official():
    return load_segmenter("testbed")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, official):
    from grounding.sam_convert import to_hf
    from grounding.sam_model import SamArchitecture

    arch = SamArchitecture.from_json(json.loads((TESTBED_SAM / "sam_config.json").read_text())["architecture"])
    return to_hf(official.model.state_dict(), arch, tmp_path_factory.mktemp("sam-hf"))


def _scene(seed=5, size=(150, 96)):
    return render_scene(seed, WorldConfig(size=size))


def test_backends_agree_on_every_prompt_kind(official, hf_dir):
    hf = load_segmenter(f"hf:{hf_dir}")
    scene = _scene()
    obj = scene.objects[0]
    ys, xs = np.nonzero(obj.mask)
    p = (float(xs[len(xs) // 2]), float(ys[len(ys) // 2]))
    q = (float(xs[0]), float(ys[0]))
    box = tuple(float(v) for v in obj.bbox)
    prompts = [SamPrompt((p,), (1,)), SamPrompt(box=box), SamPrompt((p, q), (1, 0)), SamPrompt((p,), (1,), box)]
    a, b = official.segment(scene.image, prompts), hf.segment(scene.image, prompts)
    for ra, rb in zip(a, b):
        assert ra.masks.shape == rb.masks.shape == (len(ra.scores), 96, 150)
        assert (ra.masks == rb.masks).mean() > 0.999
        assert np.allclose(ra.scores, rb.scores, atol=1e-4)
        assert np.allclose(ra.low_res, rb.low_res, atol=1e-3)
    fed = [SamPrompt((p,), (1,), mask_input=a[0].low_res[a[0].best])]
    assert np.allclose(official.segment(scene.image, fed)[0].scores, hf.segment(scene.image, fed)[0].scores, atol=1e-4)


def test_cache_embeds_each_image_once(official):
    scene = _scene(8)
    obj = scene.objects[0]
    before = official.cache_stats
    for _ in range(3):
        official.segment(scene.image, [SamPrompt(box=tuple(float(v) for v in obj.bbox))])
    after = official.cache_stats
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2


@pytest.mark.parametrize("size", [(150, 96), (64, 200), (300, 300)])
def test_point_and_box_find_the_object_at_original_resolution(official, size):
    """Coordinates go through the predictor's geometry both ways: a point on an object of a non-square image
    gives a full-resolution mask of that object (the embedded SAM is good enough to tell)."""
    scene = _scene(21, size)
    for obj in scene.objects:
        ys, xs = np.nonzero(obj.mask)
        i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        pt, bx = official.segment(
            scene.image,
            [SamPrompt(((float(xs[i]), float(ys[i])),), (1,)), SamPrompt(box=tuple(float(v) for v in obj.bbox))],
        )
        assert pt.mask.shape == (size[1], size[0])
        assert mask_iou(pt.mask, obj.mask) > 0.7
        assert mask_iou(bx.mask, obj.mask) > 0.7


def test_embedded_sam_quality_on_fresh_scenes(official):
    """A small slice of `lucid testbed eval-sam` (README has the full numbers): a regression guard."""
    from testbed.studies.sam_eval import prompt_quality

    m = prompt_quality(official, seed=99, n_scenes=16, n_foreign=6, progress=False)
    assert m["heldout"]["point"] > 0.85 and m["heldout"]["box"] > 0.85
    assert m["heldout"]["refine"] >= m["heldout"]["point"] - 0.02
    assert m["foreign"]["box"] > 0.8


def test_training_runs_resumes_and_loads(tmp_path):
    from dataclasses import replace

    from testbed.studies.sam_train import SamRecipe, train_sam

    recipe = replace(
        SamRecipe(),
        steps=2,
        batch_images=2,
        prompts_per_image=2,
        check_every=10**6,
        save_every=1,
        architecture=SMALL,
        refine_prob=1.0,
    )
    train_sam(recipe, tmp_path, progress=False)
    summary = train_sam(replace(recipe, steps=3), tmp_path, progress=False)  # resumes at step 2
    assert summary["steps"] == 3
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["step"] == 3
    assert json.loads((tmp_path / "recipe.json").read_text())["recipe"]["steps"] == 3
    seg = load_segmenter(str(tmp_path))
    res = seg.segment(_scene().image, [SamPrompt(((3.0, 4.0),), (1,))])[0]
    assert res.masks.shape == (3, 96, 150)


def test_unknown_and_missing_specs():
    from lucid.errors import CheckpointError

    for spec in ("", "nope", "vit_b:/no/such.pth", "hf:/no/such/dir", "vit_q:/x"):
        with pytest.raises(CheckpointError):
            load_segmenter(spec)


def test_the_spec_registry_is_the_single_source(official, hf_dir, tmp_path, monkeypatch):
    """`SAM_BACKENDS` is the only place a spec is understood: its help is the help every command shows, and
    for every kind the backend `check_sam_spec` accepts (or refuses) a spec with is the one `load_segmenter`
    loads it with (or refuses it with, word for word)."""
    from dataclasses import replace

    from grounding import sam
    from lucid.cli import segment_cmd, serve_cmd
    from lucid.errors import CheckpointError

    backends = dict(sam.SAM_BACKENDS)
    for b in backends.values():
        assert f"{b.syntax} ({b.help})" in sam.SAM_HELP and b.syntax in sam.SAM_SPECS
    assert segment_cmd.SAM_HELP is sam.SAM_HELP and serve_cmd.SAM_HELP is sam.SAM_HELP

    pth = tmp_path / "empty.pth"  # a file: enough for the check; its load is stubbed (no full-size SAM here)
    pth.write_bytes(b"")
    good = {
        "testbed": " testbed ",
        "vit_b": f"vit_b:{pth}",
        "vit_l": f"vit_l:{pth}",
        "vit_h": f"vit_h:{pth}",
        "hf": f"hf:{hf_dir}",
        "dir": str(TESTBED_SAM),
    }
    assert set(good) == set(backends)  # every kind is exercised
    picked: list[str] = []

    def spy(name, real):
        def load(arg, device):
            picked.append(name)
            return ("stub", name, arg) if backends[name].sa_model else real(arg, device)

        return load

    for name, b in backends.items():
        monkeypatch.setitem(sam.SAM_BACKENDS, name, replace(b, load=spy(name, b.load)))
    for name, spec in good.items():
        assert sam.parse_sam_spec(spec)[0].name == name
        sam.check_sam_spec(spec)
        picked.clear()
        seg = load_segmenter(spec)
        assert picked == [name], (spec, picked)
        if name in ("testbed", "dir"):
            assert isinstance(seg, sam.OfficialSam) and seg.source == ("testbed" if name == "testbed" else spec)
        elif name == "hf":
            assert isinstance(seg, sam.HfSam)
        else:
            assert seg == ("stub", name, str(pth))
    picked.clear()
    assert isinstance(load_segmenter(str(hf_dir)), sam.HfSam) and picked == ["dir"]  # a bare transformers DIR
    picked.clear()

    bad = {
        **{k: f"{k}:{tmp_path / 'missing.pth'}" for k in ("vit_b", "vit_l", "vit_h")},
        "hf": f"hf:{TESTBED_SAM}",  # an official-architecture dir is no transformers one
        "dir": str(tmp_path),  # a directory holding no SAM
    }
    for name, spec in bad.items():
        assert sam.parse_sam_spec(spec)[0].name == name
        with pytest.raises(CheckpointError) as checked:
            sam.check_sam_spec(spec)
        with pytest.raises(CheckpointError) as loaded:
            load_segmenter(spec)
        assert str(checked.value) == str(loaded.value), name
        if name.startswith("vit"):
            assert f"is not a file ({name} needs an official .pth)" in str(checked.value)
    assert not picked  # nothing refused reached a loader


def test_spec_checks_and_help_import_no_torch():
    code = """
import sys
from grounding.sam import SAM_HELP, check_sam_spec, parse_sam_spec
import lucid.cli.segment_cmd, lucid.cli.serve_cmd
from lucid.errors import CheckpointError
check_sam_spec('testbed'); check_sam_spec('testbed/weights/tiny-sam')
for spec in ('vit_b:/no/such.pth', 'hf:/no/dir', 'nope'):
    try:
        check_sam_spec(spec)
    except CheckpointError:
        pass
    else:
        raise SystemExit(spec)
print(bool(SAM_HELP), 'torch' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_official_vit_b_checkpoint_through_the_registry(tmp_path):
    """`vit_b:PATH` goes through `sam_model_registry` and `SamPredictor` at full size (random weights: no
    official checkpoint can be downloaded here; the shapes, geometry and output types are what is tested)."""
    sa = import_segment_anything()
    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sa.sam_model_registry["vit_b"]().state_dict(), path)
    seg = load_segmenter(f"vit_b:{path}")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    res = seg.segment(img, [SamPrompt(((10.0, 20.0),), (1,)), SamPrompt(box=(5.0, 5.0, 40.0, 30.0))])
    assert res[0].masks.shape == (3, 48, 80) and res[1].masks.shape == (1, 48, 80)
    assert res[0].low_res.shape == (3, 256, 256)


def test_bench_sam_interleaves_both_backends():
    from lucid.bench.sam import measure, to_markdown

    result = measure("testbed", rounds=2)
    md = to_markdown(result, threads=1)
    for what in ("embed", "decode x1 (per prompt)", "decode x8 (per prompt)"):
        assert what in md and what in result["ratios"]
    assert {r["backend"] for r in result["rows"]} == {"segment-anything", "transformers"}
    assert all(r["median_ms"] > 0 for r in result["rows"])
