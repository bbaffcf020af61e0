"""VAR's sink dimensions: recovered by `lucid calibrate` from a LLaVA-1.5-shaped text model whose first token
carries massive activations at LLaVA-1.5-7B's channels, and the published constants on the named backbones."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mitigation.methods.var import VAR, default_tau, named_backbone

ROOT = Path(__file__).resolve().parent.parent
SINKS = (1415, 2533)  # LLaMA-2-7B's massive-activation channels (VisAttnSink src/logic/constants.py:9)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, tiny_shape):
    """A random LLaVA with LLaMA-2-7B's hidden size (4096, 32 heads; 4 layers and a narrow MLP to stay small)
    whose BOS embedding carries massive values on channels 1415 and 2533 (600 and -500, where a layer adds
    about 1 per channel; LLaVA-1.5-7B's first token carries values in the thousands there from its early
    layers on): the residual stream keeps them, so every hidden state of the first token has |x_d| / RMS(x)
    of about 40 on those channels, and the other tokens' channels stay a few RMS at most."""
    from transformers import LlavaForConditionalGeneration

    from testbed.studies.model import build_config, build_processor, build_tokenizer

    torch.manual_seed(0)
    shape = tiny_shape(text_hidden=4096, text_layers=4, text_heads=32, text_kv_heads=8, text_mlp=256)
    tok = build_tokenizer()
    model = LlavaForConditionalGeneration(build_config(shape, tok))
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens.weight
        emb[tok.bos_token_id, SINKS[0]] = 600.0
        emb[tok.bos_token_id, SINKS[1]] = -500.0
    out = tmp_path_factory.mktemp("planted-sinks")
    model.save_pretrained(out)
    build_processor(shape, tok).save_pretrained(out)
    return out


def test_lucid_calibrate_recovers_the_planted_sink_dimensions(planted_dir, tmp_path):
    env = {**os.environ, "LUCID_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "lucid.cli", "calibrate", str(planted_dir), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cal = json.loads(proc.stdout)
    assert sorted(cal["dims"]) == sorted(SINKS)
    assert cal["massive"] and cal["first_token_score"] > 20 and cal["other_tokens_p99"] < 5
    assert cal["tau"] == pytest.approx(20.0)  # default_tau(4096): the paper's value at 7B's width
    assert Path(cal["path"]).is_file()


def _ctx(hidden: int, layers: int, mlp: int):
    text = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp)
    vlm = SimpleNamespace(n_layers=layers, n_heads=32, model=SimpleNamespace(config=SimpleNamespace(text_config=text)))
    ids = torch.zeros(1, 10, dtype=torch.long)
    image = torch.zeros(1, 10, dtype=torch.bool)
    from mitigation.seam.request import RequestContext

    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return RequestContext(vlm, None, kwargs, 1, image, torch.tensor([6]))


@pytest.mark.parametrize(
    "shape, dims",
    [((4096, 32, 11008), (1415, 2533)), ((5120, 40, 13824), (2100, 4743))],
    ids=["llava-1.5-7b", "llava-1.5-13b"],
)
def test_named_backbones_use_the_published_dims_and_tau(shape, dims):
    """On LLaMA-2-7B / 13B both presets take the official constants and tau = 20 (not Lucid's sqrt rescale,
    which would give 22.4 on 13B); no calibration runs (the context has no weights to calibrate on)."""
    assert named_backbone(SimpleNamespace(hidden_size=shape[0], num_hidden_layers=shape[1], intermediate_size=shape[2]))
    for preset in ("official", "paper"):
        hook = VAR.from_preset(preset).contribute(_ctx(*shape)).hook
        assert hook.dims == dims and hook.tau == 20.0
    assert default_tau(5120) == pytest.approx(22.36, abs=0.01)  # what the rescale alone would have given
