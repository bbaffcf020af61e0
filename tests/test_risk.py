"""The hallucination-risk score: its statistics on hand-built data, and its plumbing through generate."""

import numpy as np
import pytest
import torch

from lucid.answer import answer_batch
from lucid.risk import RiskModel, auroc, fit_risk, prompt_features, risk_recorder, token_features
from mitigation import AttentionRecorder
from vlm import SamplingParams, build_inputs, generate


def test_auroc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auroc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(auroc([0.1, 0.2], [0, 0]))


def test_fit_risk_separates_and_roundtrips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 1] + 0.2 * rng.normal(size=400)) > 0.5
    model = fit_risk(x, y, layers=[0], use_confidence=True, use_prompt=False)
    assert auroc(model.score(x), y) > 0.95
    assert abs(model.weights[1]) > 5 * max(abs(model.weights[0]), abs(model.weights[2]))
    again = RiskModel.load(model.save(tmp_path / "risk.json"))
    np.testing.assert_allclose(again.score(x), model.score(x))
    with pytest.raises(ValueError):
        fit_risk(x, np.zeros(400), [0], False, False)


def _recorder_with(rows: torch.Tensor, layer: int = 0) -> AttentionRecorder:
    rec = AttentionRecorder(layers=[layer])
    rec.add_attention(layer, rows)
    return rec


def test_token_features_hand_computed():
    # one batch row, one head, 2 recorded rows (token 0, token 1), 4 image tokens
    rows = torch.tensor([[[[0.1, 0.1, 0.1, 0.1], [0.6, 0.0, 0.0, 0.0]]]])
    f = token_features(_recorder_with(rows), [0], [2])[0]
    assert f.shape == (2, 2)
    np.testing.assert_allclose(f[:, 0], [0.4, 0.6], atol=1e-6)  # image share
    np.testing.assert_allclose(f[:, 1], [1.0, 0.0], atol=1e-6)  # uniform -> 1, one cell -> 0
    # prompt features: rows 0..1 as the question's rows: peak share max 1.0 mean 0.625, entropy min 0 mean 0.5
    p = prompt_features(_recorder_with(rows), [0], [[0, 1]])
    np.testing.assert_allclose(p[0], [1.0, 0.625, 0.0, 0.5], atol=1e-6)


def test_answer_batch_with_risk_keeps_tokens_and_scores_every_token(testbed_vlm):
    vlm = testbed_vlm
    images = ["testbed/examples/scene.png"] * 2
    questions = ["Is there a red circle in the image?", "Describe the image."]
    n_feat = 6 * vlm.n_layers + 1
    rng = np.random.default_rng(1)
    model = RiskModel(
        layers=tuple(range(vlm.n_layers)),
        use_confidence=True,
        use_prompt=True,
        mean=tuple([0.0] * n_feat),
        std=tuple([1.0] * n_feat),
        weights=tuple(rng.normal(size=n_feat)),
        bias=0.0,
    )
    plain = answer_batch(vlm, images, questions, SamplingParams(max_new_tokens=12))
    scored = answer_batch(vlm, images, questions, SamplingParams(max_new_tokens=12), risk=model)
    for a, b in zip(plain, scored):
        assert a.generation.token_ids == b.generation.token_ids
        assert a.risk is None and b.risk is not None
        assert len(b.token_risk) == max(1, len(b.generation.token_ids))
        assert 0.0 < b.risk < 1.0
        assert b.risk == pytest.approx(float(np.mean(b.token_risk)))
    # the same row alone gives the same risk (batch neighbours do not leak into the features)
    alone = answer_batch(vlm, images[1:], questions[1:], SamplingParams(max_new_tokens=12), risk=model)[0]
    assert alone.risk == pytest.approx(scored[1].risk, abs=1e-4)
    # the features are the recorder's, scored by the model: recomputed here by hand from one recording
    inputs = build_inputs(vlm, images, questions)
    rec = risk_recorder(model)
    gens = generate(vlm, inputs, SamplingParams(max_new_tokens=12), recorder=rec)
    T = inputs.input_ids.shape[1]
    rows = [range(max(lay.all_token_positions) + 1, T) for lay in inputs.layouts]
    feats = token_features(
        rec, model.layers, [max(1, len(g.token_ids)) for g in gens], T, [g.token_logprobs for g in gens], rows
    )
    for f, b in zip(feats, scored):
        np.testing.assert_allclose(model.score(f), b.token_risk, atol=1e-6)
    # a recorder that cannot feed the model is refused with a clear message
    with pytest.raises(ValueError, match="prefill_rows"):
        risk_recorder(model, AttentionRecorder(layers=None, prefill_rows="last"))
