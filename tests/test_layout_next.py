"""LLaVA-NeXT's high-resolution view (`anyres_view`) against the real transformers processor and model
packing, on wide, tall, square and odd-sized images."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.layout import ImageLayout, anyres_token_count, anyres_view, clip_geometry, select_best_resolution

# name: (tile side S, vision patch p, image_grid_pinpoints [(height, width), ...])
CONFIGS = {
    "tiny": (32, 8, [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64], [96, 96]]),
    "v1.6": (336, 14, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),  # llava-v1.6 / llava-hf
}
SIZES = {  # (width, height) per config: wide, tall, square, odd
    "tiny": [(160, 60), (50, 170), (64, 64), (57, 131), (333, 120), (97, 31), (200, 190), (7, 5)],
    "v1.6": [(800, 450), (450, 800), (640, 640), (1000, 333), (353, 1111), (1293, 672), (301, 97)],
}
CASES = [(name, size) for name in CONFIGS for size in SIZES[name]]
NON_SQUARE = [(name, (w, h)) for name, (w, h) in CASES if w != h and min(w, h) >= 30]


@pytest.fixture(scope="module")
def tokenizer():
    from testbed.studies.model import build_tokenizer

    return build_tokenizer()


def _processor(name, tokenizer):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tile, patch, pinpoints = CONFIGS[name]
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    )
    return LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _layout(name, size, n_before=0):
    """The layout of an image whose image tokens sit at n_before, n_before + 1, ... (base view first)."""
    tile, patch, pinpoints = CONFIGS[name]
    g = tile // patch
    n = g * g + anyres_token_count(size, pinpoints, tile, patch)
    pos = list(range(n_before, n_before + n))
    base = ImageLayout(tuple(pos[: g * g]), (g, g), patch, clip_geometry(size, None, (tile, tile), None))
    tiles = anyres_view(size, pinpoints, tile, patch, pos[g * g :])
    return ImageLayout(base.token_positions, base.grid, patch, base.geometry, tiles)


def _spot_image(w, h, x, y, r):
    a = np.zeros((h, w, 3), np.uint8)
    a[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_arithmetic_matches_transformers_on_a_sweep(name, tokenizer):
    """Best resolution, unpadded grid and token count agree with transformers' own functions."""
    from transformers.image_processing_utils import select_best_resolution as hf_best
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    tile, patch, pinpoints = CONFIGS[name]
    proc = _processor(name, tokenizer)
    g = tile // patch
    step = 7 if name == "tiny" else 61
    for w in range(3, 25 * step, step):
        for h in range(2, 25 * step, step + 4):
            assert select_best_resolution((h, w), pinpoints) == hf_best((h, w), pinpoints)
            n_hi = anyres_token_count((w, h), pinpoints, tile, patch)
            # the processor's count: base g*g (+1 CLS) + unpadded cells + newlines, minus the CLS ("default")
            assert g * g + n_hi == proc._get_number_of_features(h, w, tile, tile) - 1, (w, h)
            view = _layout(name, (w, h)).tiles
            rows, cols = view.tile_grid
            unpadded = unpad_image(torch.zeros(1, rows * g, cols * g), [h, w])
            assert tuple(unpadded.shape[1:]) == view.grid, (w, h)


@pytest.mark.parametrize("name,size", CASES)
def test_token_count_matches_processor(name, size, tokenizer):
    """The processor's emitted image tokens = base cells + tile cells + one newline per tile-grid row, and
    pixel_values holds the base view plus exactly the tiles the view names."""
    from testbed.studies.model import IMAGE

    proc = _processor(name, tokenizer)
    w, h = size
    enc = proc(images=Image.new("RGB", (w, h)), text=f"{IMAGE}\nWhat is it?", return_tensors="pt")
    n_emitted = int((enc["input_ids"][0] == proc.image_token_id).sum())
    assert enc["image_sizes"][0].tolist() == [h, w]
    layout = _layout(name, size)
    view = layout.tiles
    assert n_emitted == len(layout.all_token_positions)
    assert n_emitted == layout.n_tokens + view.n_tokens + len(layout.newline_positions)
    assert view.n_tokens == view.grid[0] * view.grid[1] and len(view.newline_positions) == view.grid[0]
    assert enc["pixel_values"].shape[1] == 1 + view.tile_grid[0] * view.tile_grid[1]
    # newlines close every grid row: position of the last cell of row r, plus one
    cols = view.grid[1]
    for r, nl in enumerate(view.newline_positions):
        assert nl == view.token_positions[r * cols + cols - 1] + 1


@pytest.mark.parametrize("name,size", CASES)
def test_tile_cells_round_trip(name, size):
    view = _layout(name, size).tiles
    rows, cols = view.grid
    p = view.patch_size
    seen = set()
    for r in range(rows):
        for c in range(cols):
            cx, cy = view.cell_center(r, c)
            assert view.cell_of(cx, cy) == (r, c)
            x0, y0, x1, y1 = view.cell_box(r, c)
            assert x0 < cx < x1 and y0 < cy < y1
            k, tr, tc = view.tile_cell(r, c)
            assert 1 <= k <= view.tile_grid[0] * view.tile_grid[1] and 0 <= tr < view.tile_cells > tc >= 0
            seen.add((k, tr, tc))
    assert len(seen) == rows * cols  # no two cells come from the same tile patch
    # the unpad crop works in whole cells: it can cut at most one patch of canvas off each side
    w, h = view.geometry.original_size
    x0, y0, x1, y1 = view.geometry.visible_box()
    sx, sy = view.geometry.scale
    assert max(x0 * sx, (w - x1) * sx, y0 * sy, (h - y1) * sy) <= p
    full = view.to_original_map(np.arange(rows * cols).reshape(rows, cols))
    assert full.shape == (h, w)
    if rows * cols:
        assert np.nanmax(full) == rows * cols - 1 and not np.isnan(full[h // 2, w // 2])


@pytest.mark.parametrize("name,size", NON_SQUARE)
def test_bright_spot_lands_in_the_predicted_tile_cell(name, size, tokenizer):
    """A bright spot at a known original pixel, through the real LlavaNextImageProcessor: its centroid in
    the reassembled, unpadded tile canvas is where the geometry says (< 1 px), and the tile patch
    `tile_cell` names for the predicted cell is bright in pixel_values."""
    proc = _processor(name, tokenizer).image_processor
    view = _layout(name, size).tiles
    w, h = size
    p, (tr, tc) = view.patch_size, view.tile_grid
    sx, sy = view.geometry.scale
    radius = max(2, int(np.ceil(4 / min(sx, sy))))  # at least ~8 canvas pixels across
    x0, y0, x1, y1 = view.geometry.visible_box()
    rng = np.random.default_rng(w * 7919 + h)
    for _ in range(4):
        x = int(rng.uniform(x0 + radius + 1, x1 - radius - 1))
        y = int(rng.uniform(y0 + radius + 1, y1 - radius - 1))
        pv = proc(_spot_image(w, h, x, y, radius), return_tensors="np")["pixel_values"][0].mean(1)  # [P, S, S]
        assert pv.shape[0] == 1 + tr * tc
        tile = pv.shape[-1]
        canvas = pv[1:].reshape(tr, tc, tile, tile).transpose(0, 2, 1, 3).reshape(tr * tile, tc * tile)
        r0, c0 = view.cell_offset
        unpadded = canvas[r0 * p : (r0 + view.grid[0]) * p, c0 * p : (c0 + view.grid[1]) * p]
        thr = (unpadded.max() + unpadded.min()) / 2
        ys, xs = np.nonzero(unpadded > thr)
        got = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        want = view.geometry.to_processed(np.array([x + 0.5, y + 0.5]))
        assert np.abs(got - want).max() < 1.0, (name, size, (x, y), got, want)
        cell = view.cell_of(x + 0.5, y + 0.5)
        measured = (int(got[1] // p), int(got[0] // p))
        assert cell is not None and max(abs(cell[0] - measured[0]), abs(cell[1] - measured[1])) <= 1
        # straight from pixel_values, without the reassembly: tile k, patch (pr, pc) holds the spot
        k, pr, pc = view.tile_cell(*cell)
        qx, qy = want - np.array(cell[::-1]) * p  # the spot's centre inside its cell, processed px
        assert pv[k, int(pr * p + qy), int(pc * p + qx)] > thr, (name, size, (x, y), cell, (k, pr, pc))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_packs_in_the_layouts_order(name):
    """transformers' own `pack_image_features` on features that encode (tile, patch row, patch col): the
    packed sequence puts tile_cell(r, c) at each tile cell's token, the base view's (0, r, c) at its
    tokens, and the model's image_newline at every newline position."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    tile, patch, pinpoints = CONFIGS[name]
    g = tile // patch
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=tile,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
        ),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextModel(cfg).eval()
    for w, h in SIZES[name]:
        layout = _layout(name, (w, h), n_before=5)
        view = layout.tiles
        n_tiles = view.tile_grid[0] * view.tile_grid[1]
        k, rc = torch.meshgrid(torch.arange(1 + n_tiles), torch.arange(g * g), indexing="ij")
        feats = torch.stack([k, rc // g, rc % g], -1).float()  # [1 + tiles, g*g, 3]: (tile, row, col)
        newline = torch.full((3,), -1.0)
        with torch.no_grad():
            packed, lens = model.pack_image_features([feats], torch.tensor([[h, w]]), "default", newline)
        packed = packed[0]  # [N, 3], in image-token order
        assert packed.shape[0] == len(layout.all_token_positions) == int(lens[0])
        index = {pos: i for i, pos in enumerate(layout.all_token_positions)}
        for r in range(g):
            for c in range(g):
                assert packed[index[layout.token_positions[r * g + c]]].tolist() == [0, r, c]
        rows, cols = view.grid
        for r in range(rows):
            for c in range(cols):
                got = packed[index[view.token_positions[r * cols + c]]].tolist()
                assert got == list(view.tile_cell(r, c)), ((w, h), (r, c))
        for pos in layout.newline_positions:
            assert packed[index[pos]].tolist() == [-1, -1, -1]


def test_anyres_view_rejects_a_wrong_token_count():
    tile, patch, pinpoints = CONFIGS["tiny"]
    n = anyres_token_count((160, 60), pinpoints, tile, patch)
    with pytest.raises(ValueError, match="newlines"):
        anyres_view((160, 60), pinpoints, tile, patch, list(range(n - 1)))
