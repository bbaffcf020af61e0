"""Does position survive into the image tokens? A ridge probe of each image token's grid (row, col).

For the features at three depths (the vision tower's input embeddings = patch + position, the vision
layer the projector reads = `vision_feature_layer`, and the projector's output = the image tokens the
text model sees), a ridge regression from the token's features to its grid row and column is fitted
on some scenes and scored (R^2) on others. The gaze notes measured 0.75 / 0.48 / 0.03 (row) on the
first checkpoint: its projector threw position away, so nothing downstream could learn boxes.
"""

from __future__ import annotations

import numpy as np
import torch

from testbed.world.scenes import WorldConfig, scenes
from vlm import VLM


@torch.inference_mode()
def _features(vlm: VLM, images: list) -> dict[str, np.ndarray]:
    model = vlm.model
    cfg = model.config
    pix = vlm.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(vlm.device, vlm.dtype)
    tower = model.model.vision_tower
    out = tower(pix, output_hidden_states=True)
    layer = out.hidden_states[cfg.vision_feature_layer][:, 1:]  # [B, N, Dv] ("default": CLS dropped)
    projected = model.model.multi_modal_projector(layer)  # [B, N, D]
    return {
        "vision input (patch + position)": out.hidden_states[0][:, 1:].float().cpu().numpy(),
        f"vision layer {cfg.vision_feature_layer} (projector input)": layer.float().cpu().numpy(),
        "projector output (image tokens)": projected.float().cpu().numpy(),
    }


def _ridge_r2(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, lam: float) -> np.ndarray:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    ym = ytr.mean(0)
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (ytr - ym))
    pred = b @ w + ym
    return 1 - ((yte - pred) ** 2).sum(0) / ((yte - yte.mean(0)) ** 2).sum(0)


def position_probe(vlm: VLM, n_fit: int = 90, n_test: int = 30, seed: int = 31, lam: float = 10.0) -> dict:
    """R^2 of (row, col) from each depth's features, fitted on `n_fit` scenes, scored on `n_test` others."""
    imgs = [s.image for s in scenes(seed, n_fit + n_test, WorldConfig())]
    feats = _features(vlm, imgs)
    n = next(iter(feats.values())).shape[1]
    g = int(round(n**0.5))
    rc = np.stack([np.arange(n) // g, np.arange(n) % g], -1).astype(np.float64)  # [N, 2]
    out = {}
    for name, f in feats.items():
        xtr = f[:n_fit].reshape(-1, f.shape[-1])
        xte = f[n_fit:].reshape(-1, f.shape[-1])
        r2 = _ridge_r2(xtr, np.tile(rc, (n_fit, 1)), xte, np.tile(rc, (n_test, 1)), lam)
        out[name] = {"r2_row": round(float(r2[0]), 3), "r2_col": round(float(r2[1]), 3)}
    return out
