import numpy as np
import pytest

from testbed.world.language import category_frequency, cooccurrence
from testbed.world.render import decode_mask, render_dataset
from testbed.world.scenes import CATEGORIES, PAIRS, TRAIN_CONFIG, WorldConfig, partner_of, render_scene, scenes


def test_scenes_are_deterministic_by_seed():
    a, b = render_scene(7), render_scene(7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [(o.name, o.bbox) for o in a.objects] == [(o.name, o.bbox) for o in b.objects]
    c = render_scene(8)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("cfg", [WorldConfig(), TRAIN_CONFIG, WorldConfig(size=(160, 120), supersample=1)])
def test_ground_truth_matches_pixels(cfg):
    for s in scenes(3, 40, cfg):
        assert 1 <= len(s.objects) <= 4
        img = np.asarray(s.image).astype(int)
        assert img.shape[:2] == (cfg.size[1], cfg.size[0])
        for o in s.objects:
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.bbox
            # the visible mask is painted in the object's own colour (allowing anti-aliasing and noise)
            mean = img[o.mask].mean(0)
            assert np.abs(mean - np.array(o.rgb)).max() < 30, (o.name, mean, o.rgb)
        masks = [o.mask for o in s.objects]
        if len(masks) > 1:
            assert np.sum(masks, axis=0).max() == 1  # visible masks never overlap


def test_cooccurrence_bias_is_strong_in_training_distribution():
    ref = list(scenes(0, 1500, TRAIN_CONFIG))
    freq, co = category_frequency(ref), cooccurrence(ref)
    for a, b in PAIRS:
        assert co[a][b] / freq[a] > 0.8, (a, b)
    free = [c for c in CATEGORIES if partner_of(c) is None]
    for c in free:
        assert max(co[c].values()) / freq[c] < 0.45


def test_render_dataset_writes_pngs_and_rle(tmp_path):
    import json

    from PIL import Image

    out = render_dataset(tmp_path / "d", 3, seed=1)
    lines = [json.loads(x) for x in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    scene = render_scene(lines[0]["seed"])
    assert Image.open(out / lines[0]["file"]).size == (96, 96)
    for rec, obj in zip(lines[0]["objects"], scene.objects):
        assert np.array_equal(decode_mask(rec["mask"]), obj.mask)
        assert rec["bbox"] == list(obj.bbox)


def test_invalid_world_config_is_rejected():
    with pytest.raises(ValueError, match="min_objects"):
        WorldConfig(min_objects=3, max_objects=2)


def test_occluded_partners_are_hidden_behind_their_anchor():
    found = 0
    for s in scenes(5, 400, TRAIN_CONFIG):
        for o in s.occluded:
            found += 1
            assert partner_of(o.category) in s.categories()
            covered = np.zeros_like(o.mask)
            for v in s.objects:
                covered |= v.mask
            assert covered[o.mask].all()  # every pixel of the hidden object shows something else
            assert o.category in s.categories(include_occluded=True)
    assert found > 20
    # the evaluation distribution has none
    assert not any(s.occluded for s in scenes(5, 200))


def test_referable_objects_are_those_a_colour_shape_phrase_names_uniquely():
    from PIL import Image

    from testbed.world.scenes import Scene, SceneObject, referable_objects

    def obj(color, shape):
        return SceneObject(shape, color, (0, 0, 0), (0, 0, 1, 1), np.ones((1, 1), bool))

    red_c, blue_s1, blue_s2, green_t, yellow_c = (
        obj("red", "circle"),
        obj("blue", "square"),
        obj("blue", "square"),
        obj("green", "triangle"),
        obj("yellow", "circle"),
    )
    scene = Scene(Image.new("RGB", (1, 1)), (red_c, blue_s1, green_t, blue_s2), 128, 0, occluded=(yellow_c,))
    assert referable_objects(scene) == [red_c, green_t]  # the two blue squares are ambiguous
    hidden_twin = Scene(Image.new("RGB", (1, 1)), (red_c, green_t), 128, 0, occluded=(obj("red", "circle"),))
    assert referable_objects(hidden_twin) == [green_t]  # an occluded twin makes the phrase ambiguous too
    for s in scenes(5, 30, TRAIN_CONFIG):
        cats = [o.category for o in s.all_objects(include_occluded=True)]
        assert [o.category for o in referable_objects(s)] == [c for c in cats[: len(s.objects)] if cats.count(c) == 1]
