"""Each method's edit inside a real forward of the testbed model, checked against its formula applied by
hand to the unedited values of that very layer call.

Forward hooks (`Tap`) capture, per layer and per model call (the prefill, decode steps 1 and 2), the hidden
state entering the decoder layer, the query (projected and rotated here from the self-attention's input),
the keys / values the KV cache holds after the call and the heads' output before o_proj. From q, K, V this
file computes the plain attention by hand (fp64), applies the method's published formula, and compares the
result with what the layer produced (the o_proj input, and the attention recorder's probabilities on the
image keys). The batch is left padded, three rows of different prompt lengths. Each test names the mistake
it catches; several assert first that the data can tell the right formula from the wrong one.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import mitigation
from mitigation import AttentionRecorder
from mitigation.methods import parse_methods
from mitigation.methods.paint import cls_attention, select_tokens
from mitigation.seam.request import stream_rows
from testbed.world.scenes import render_scene
from vlm import SamplingParams, build_inputs, generate

QUESTIONS = ["Is there a red circle in the image?", "Describe.", "What color is the square?"]
SAMPLING = SamplingParams(max_new_tokens=3, ignore_eos=True)  # calls: the prefill, decode steps 1 and 2
TOL = {"rtol": 1e-4, "atol": 2e-5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: the tensors are tiny, and on a shared machine a second thread
    spinning for a busy core makes each small matmul ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LUCID_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def batch(testbed_vlm):
    inputs = build_inputs(testbed_vlm, [render_scene(i).image for i in range(3)], QUESTIONS)
    lengths = inputs.attention_mask.sum(-1).tolist()
    assert len(set(lengths)) == 3 and not inputs.attention_mask.bool().all(), "rows of different lengths, left padded"
    assert bool(inputs.attention_mask[:, -1].all()), "left padding"
    return inputs


# ------------------------------------------------------------------------------------------ capture


class Tap:
    """Forward hooks on chosen decoder layers of the text backbone; `calls[layer]` holds one dict per model
    call: `hidden` (entering the decoder layer), `q` [R, H, Tq, D] (q_proj + rotary, computed here from the
    self-attention's input), `k`, `v` [R, Hkv, Tk, D] (the KV cache after the call), `out` [R, Tq, H*D]
    (o_proj's input). `masks` holds each call's 2-D attention mask, `ids` the token ids embedded."""

    def __init__(self, vlm, layers) -> None:
        self.lm = vlm.model.model.language_model
        self.layers = list(layers)
        self.calls: dict[int, list[dict]] = {layer: [] for layer in self.layers}
        self.masks: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> Tap:
        lm, h = self.lm, self._handles
        h.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(lm.embed_tokens.register_forward_pre_hook(lambda m, a: self.ids.append(a[0].clone())))
        for layer in self.layers:
            block = lm.layers[layer]
            h.append(block.register_forward_pre_hook(partial(self._block_pre, layer), with_kwargs=True))
            h.append(block.self_attn.register_forward_pre_hook(partial(self._attn_pre, layer), with_kwargs=True))
            h.append(block.self_attn.register_forward_hook(partial(self._attn_post, layer), with_kwargs=True))
            h.append(block.self_attn.o_proj.register_forward_pre_hook(partial(self._o_pre, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _lm_pre(self, module, args, kwargs) -> None:
        self.masks.append(kwargs["attention_mask"].bool().clone())

    def _block_pre(self, layer, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls[layer].append({"hidden": hidden.clone()})

    def _attn_pre(self, layer, module, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        b, t, _ = x.shape
        q = module.q_proj(x).view(b, t, -1, module.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        self.calls[layer][-1]["q"] = q.clone()

    def _attn_post(self, layer, module, args, kwargs, output) -> None:
        cache = kwargs["cache"]
        self.calls[layer][-1]["k"] = cache.layers[layer].keys.clone()
        self.calls[layer][-1]["v"] = cache.layers[layer].values.clone()

    def _o_pre(self, layer, module, args) -> None:
        self.calls[layer][-1]["out"] = args[0].clone()


def run(vlm, inputs, methods, layers, record=()):
    """generate() with `methods` under a Tap on `layers` (and a recorder of every prompt row on `record`).
    Returns (the prepared request, the tap, the recorder)."""
    seen = {}
    real = mitigation.prepare

    def prepare(*args, **kwargs):
        seen["request"] = real(*args, **kwargs)
        return seen["request"]

    rec = AttentionRecorder(layers=record, prefill_rows="all") if record else None
    mitigation.prepare = prepare  # decoding calls mitigation.prepare: keep the request it built
    try:
        with Tap(vlm, layers) as tap:
            generate(vlm, inputs, SAMPLING, methods=parse_methods(methods), recorder=rec)
    finally:
        mitigation.prepare = real
    assert all(len(tap.calls[layer]) == SAMPLING.max_new_tokens for layer in layers)
    return seen.get("request"), tap, rec


# ------------------------------------------------------------------------------- attention by hand


def logits(vlm, layer, call) -> torch.Tensor:
    """z = q k^T * scale [R, H, Tq, Tk] in fp64 (grouped-query heads: head h reads kv head h // (H / Hkv))."""
    q, k = call["q"].double(), call["k"].double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ k.transpose(-1, -2) * vlm.text_model.layers[layer].self_attn.scaling


def allowed(valid: torch.Tensor, tq: int) -> torch.Tensor:
    """[R, 1, Tq, Tk]: causal (queries are the last Tq positions) and the key is not padding."""
    tk = valid.shape[1]
    q_pos = torch.arange(tk - tq, tk)[:, None]
    return valid[:, None, None, :] & (torch.arange(tk)[None, :] <= q_pos)[None, None]


def softmax(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z.masked_fill(~allowed(valid, z.shape[2]), float("-inf")), -1).nan_to_num(0.0)


def heads_out(p: torch.Tensor, call) -> torch.Tensor:
    """p [R, H, Tq, Tk] @ V -> [R, Tq, H, D] (the heads' outputs before o_proj)."""
    v = call["v"].double()
    v = v.repeat_interleave(p.shape[1] // v.shape[1], dim=1)
    return (p @ v).transpose(1, 2)


def query_rows(valid: torch.Tensor, tq: int) -> torch.Tensor:
    """[R, Tq] bool: query rows that are real tokens (not left padding)."""
    return valid[:, valid.shape[1] - tq :]


def assert_heads(call, expected: torch.Tensor, valid: torch.Tensor, where: object = "") -> None:
    """The o_proj input of `call` equals `expected` [R, Tq, H, D] on every real query row."""
    got = call["out"].double()
    want = expected.reshape(*expected.shape[:2], -1)
    keep = query_rows(valid, got.shape[1])
    torch.testing.assert_close(got[keep], want[keep], **TOL, msg=lambda m: f"{m}\nat (layer, step) = {where}")


def gap(call, expected: torch.Tensor, valid: torch.Tensor, rows: slice = slice(None)) -> float:
    """Largest difference between the layer's o_proj input and `expected` on the real query rows."""
    got = call["out"].double()
    want = expected.reshape(*expected.shape[:2], -1)
    keep = query_rows(valid, got.shape[1])[rows]
    return float((got[rows][keep] - want[rows][keep]).abs().max())


def pad_to(mask: torch.Tensor, rows: int, tk: int) -> torch.Tensor:
    """A [B, T] key mask as [rows, tk]: rows past B (a second stream) and keys past T (generated) are False."""
    out = torch.zeros(rows, tk, dtype=torch.bool)
    out[: mask.shape[0], : mask.shape[1]] = mask
    return out


def image_keys(vlm, inputs) -> torch.Tensor:
    return inputs.input_ids == vlm.image_token_id  # [B, T]


def boost_last_row(z: torch.Tensor, keys: torch.Tensor, alpha: float, absolute: bool = True) -> torch.Tensor:
    """The last query row's logits on `keys` [R, Tk] become z + alpha * |z| (or, the mistake, z + alpha * z)."""
    out = z.clone()
    last = z[:, :, -1:]
    out[:, :, -1:] = torch.where(keys[:, None, None, :], last + alpha * (last.abs() if absolute else last), last)
    return out


# ---------------------------------------------------------------------------------------------- PAI


@pytest.fixture(scope="module")
def baseline_tap(testbed_vlm, batch):
    _, tap, _ = run(testbed_vlm, batch, [], range(6))
    return tap


def test_pai_paper_edits_the_last_row_on_image_keys_by_alpha_abs_z(testbed_vlm, batch, baseline_tap):
    """pai:preset=paper (alpha 0.5, every answer token edited): in every edited layer (1..5) and every call,
    the last query row's logits on the image keys are z + 0.5 |z| of the layer's unedited z; other keys,
    other rows, layer 0 and the image-free stream's rows are the plain attention. At prefill in layer 1 the
    unedited z is the baseline run's (the same inputs reach it). Catches a wrong alpha, z instead of |z|,
    editing every row, and an edit reaching the second stream."""
    vlm, B, alpha = testbed_vlm, batch.batch_size, 0.5
    req, tap, rec = run(vlm, batch, ["pai:preset=paper"], range(6), record=(1, 3, 5))
    assert req.rows == 2 * B  # guidance's image-free stream runs in the same batch
    image = image_keys(vlm, batch)
    for layer in range(6):
        for step, call in enumerate(tap.calls[layer]):
            valid = tap.masks[step]
            z = logits(vlm, layer, call)
            plain = heads_out(softmax(z, valid), call)
            if layer == 0:
                assert_heads(call, plain, valid, (layer, step))
                continue
            keys = pad_to(image, z.shape[0], z.shape[-1])
            p = softmax(boost_last_row(z, keys, alpha), valid)
            assert_heads(call, heads_out(p, call), valid, (layer, step))
            # the data tell the formula from its mistakes: no edit, z instead of |z|, another alpha
            assert gap(call, plain, valid, slice(0, B)) > 1e-4, (layer, step)
            for wrong in (boost_last_row(z, keys, alpha, absolute=False), boost_last_row(z, keys, 0.2)):
                assert gap(call, heads_out(softmax(wrong, valid), call), valid) > 1e-4, (layer, step)
            if layer in rec.attention:  # the recorded (edited) probabilities of the request's rows on the image keys
                got = rec.attention[layer][step]  # [B, H, Tq, N]
                rows = query_rows(valid[:B], got.shape[2])
                for b in range(B):
                    want = p[b][:, :, image[b].nonzero().flatten()].float()
                    torch.testing.assert_close(got[b][:, rows[b]], want[:, rows[b]], **TOL)
    # layer 1 at prefill: the edited run's q, k are the baseline's, and its output is the formula on the baseline's z
    base, call = baseline_tap.calls[1][0], tap.calls[1][0]
    valid = tap.masks[0][:B]
    torch.testing.assert_close(call["hidden"][:B][valid], base["hidden"][valid])
    for name in ("q", "k"):
        torch.testing.assert_close(call[name][:B].transpose(1, 2)[valid], base[name].transpose(1, 2)[valid])
    z = logits(vlm, 1, base)
    want = heads_out(softmax(boost_last_row(z, image, alpha), valid), {"v": base["v"]})
    torch.testing.assert_close(call["out"][:B, -1].double(), want[:, -1].reshape(B, -1), **TOL)


def test_pai_official_leaves_the_first_answer_token_and_edits_decode_steps(testbed_vlm, batch):
    """pai (official: alpha 0.2, first_token=false): the prefill is the plain attention in every layer;
    decode steps 1 and 2 get z + 0.2 |z| on the image keys. Catches the switch ignored (prefill edited) and
    the switch over-applied (decode unedited)."""
    vlm, B = testbed_vlm, batch.batch_size
    _, tap, _ = run(vlm, batch, ["pai"], range(1, 6))
    image = image_keys(vlm, batch)
    for layer in range(1, 6):
        for step, call in enumerate(tap.calls[layer]):
            valid = tap.masks[step]
            z = logits(vlm, layer, call)
            plain = heads_out(softmax(z, valid), call)
            keys = pad_to(image, z.shape[0], z.shape[-1])
            edited = heads_out(softmax(boost_last_row(z, keys, 0.2), valid), call)
            if step == 0:
                assert_heads(call, plain, valid, (layer, step))
                assert gap(call, edited, valid, slice(0, B)) > 1e-4  # the edit would show at prefill
            else:
                assert_heads(call, edited, valid, (layer, step))
                assert gap(call, plain, valid, slice(0, B)) > 1e-4


# ---------------------------------------------------------------------------------------------- VHR


def heads_by_hand(main: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """The paper's head choice (Eq. 6-7) from the last position's head outputs [B, H, D] of both streams:
    VHD = ||A(image) - A(free)||, zeroed where VHD and TA = ||A(free)||^2 both exceed mean + std (population)
    over the heads; selected: VHD above the heads' median."""
    out = []
    for m, f in zip(main.numpy(), free.numpy()):
        vhd = np.linalg.norm(m - f, axis=-1)
        ta = (f**2).sum(-1)
        outlier = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
        vhd = np.where(outlier, 0.0, vhd)
        out.append(vhd > np.median(vhd))
    return torch.tensor(np.array(out))


@pytest.fixture(scope="module")
def vhr_run(testbed_vlm, batch):
    return run(testbed_vlm, batch, ["vhr"], range(6))


def test_vhr_scales_the_chosen_heads_at_prefill_and_at_every_decode_step(testbed_vlm, batch, vhr_run):
    """vhr (alpha 2, layers 1, 3, 4, 5, the image-free stream scaled too): at prefill the heads chosen from
    the two streams' unscaled last-position outputs of that layer are the hook's, and their outputs before
    o_proj are 2x the unscaled ones at every prompt position of both streams; at decode steps 1 and 2 the
    same heads of the request's rows are 2x the unscaled output of that step. Catches the decode-step
    scaling deleted (the `edit` path), a selection fed other rows, and scaling reaching unselected heads."""
    vlm, B, alpha = testbed_vlm, batch.batch_size, 2.0
    req, tap, _ = vhr_run
    hook = req.hooks[0]
    assert req.model_kwargs["input_ids"].shape[0] == 2 * B and sorted(hook.attention_layers) == [1, 3, 4, 5]
    for layer in range(6):
        for step, call in enumerate(tap.calls[layer]):
            valid = tap.masks[step]
            plain = heads_out(softmax(logits(vlm, layer, call), valid), call)  # [R, Tq, H, D]
            if layer not in hook.attention_layers:
                assert_heads(call, plain, valid, (layer, step))
                continue
            if step == 0:
                assert plain.shape[0] == 2 * B
                chosen = heads_by_hand(plain[:B, -1], plain[B:, -1])
                assert torch.equal(hook.selected[layer].cpu(), chosen), layer
                assert bool(chosen.any(-1).all()) and not bool(chosen.all())
                scale = torch.where(chosen, alpha, 1.0).double()
                scale = torch.cat([scale, scale])  # both streams (scale_free_stream=true)
            else:
                assert plain.shape[0] == B  # the stream is dropped after the prefill
                scale = torch.where(hook.selected[layer].cpu(), alpha, 1.0).double()
            assert_heads(call, plain * scale[:, None, :, None], valid, (layer, step))
            assert gap(call, plain, valid) > 1e-3, (layer, step)  # the scaling is visible


def test_vhr_image_free_stream_is_the_prompt_without_its_image_left_padded(testbed_vlm, batch, vhr_run):
    """The second stream's rows hold no image token, the request row's text tokens in order, left padded to
    the request's length; they are what the model embedded at prefill. Catches image tokens kept, text
    dropped or reordered, right padding, and a longer or shorter stream."""
    vlm, B = testbed_vlm, batch.batch_size
    req, tap, _ = vhr_run
    tok = vlm.processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    T = batch.input_ids.shape[1]
    built = stream_rows(vlm, batch, "strip")
    for kwargs in (req.model_kwargs, built):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        assert ids.shape == (2 * B, T) and mask.shape == (2 * B, T)
        assert torch.equal(ids[:B], batch.input_ids) and torch.equal(mask[:B], batch.attention_mask)
        assert not bool((ids[B:] == vlm.image_token_id).any())
        for b in range(B):
            row = batch.input_ids[b]
            text = row[batch.attention_mask[b].bool() & (row != vlm.image_token_id)].tolist()
            n = len(text)
            assert n < int(batch.attention_mask[b].sum())  # the image was there to strip
            assert ids[B + b].tolist() == [pad] * (T - n) + text
            assert mask[B + b].tolist() == [0] * (T - n) + [1] * n
    assert torch.equal(tap.ids[0], req.model_kwargs["input_ids"])  # the rows the model ran
    assert torch.equal(tap.masks[0], req.model_kwargs["attention_mask"].bool())
    assert tap.ids[1].shape == (B, 1)  # decode steps: the request's rows only


# ---------------------------------------------------------------------------------------------- VAR

VAR_SPEC = "var:preset=paper,sink_dims=1,tau=5.8,rho=0.1"  # moved share 0.6, gate 0.2, rho 0.1, layers 1..4


def phi_by_hand(hidden: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """|x_dim| / sqrt(mean(x^2) + 1e-6) per token."""
    x = hidden.double()
    return x[..., dim].abs() / (x.pow(2).mean(-1) + 1e-6).sqrt()


def redistribute_by_hand(p, source, target, gate_keys, row_start, f=0.6, min_image=0.2, ratio=0.1):
    """VAR (paper semantics) on probabilities p [R, H, Tq, Tk]: in a row at or after row_start whose image
    mass I >= min_image, non-sink image mass N >= ratio * I and N > 0, a share f of every sink's mass goes
    to the targets in proportion to their attention."""
    tk, tq = p.shape[-1], p.shape[2]
    src, dst, img = (m[:, None, None, :] for m in (source, target, gate_keys))
    s_mass = (p * src).sum(-1, keepdim=True)
    n_mass = (p * dst).sum(-1, keepdim=True)
    i_mass = (p * img).sum(-1, keepdim=True)
    q_pos = torch.arange(tk - tq, tk)
    after = (q_pos[None, :] >= row_start[:, None])[:, None, :, None]
    gate = (i_mass >= min_image) & (n_mass >= ratio * i_mass) & (n_mass > 0) & after
    new = torch.where(src, p * (1 - f), p)
    new = torch.where(dst, new + f * s_mass * p / n_mass.clamp_min(1e-300), new)
    return torch.where(gate, new, p)


@pytest.fixture(scope="module")
def var_run(testbed_vlm, batch):
    return run(testbed_vlm, batch, [VAR_SPEC], range(6), record=(2,))


def test_var_sinks_from_the_layer_input_and_redistribution_after_the_image(testbed_vlm, batch, var_run):
    """var (paper semantics, sink dim 1, tau 5.8): in each edited layer (1..4) the hook's sinks are the
    prompt tokens whose hidden state ENTERING the layer has phi > tau; every query row after the image (at
    prefill: the question rows; then each decode row) has the redistribution of the unedited probabilities
    of that call, sinks giving 0.6 of their mass to the non-sink image tokens; the image rows and the rows
    before them are the plain attention. Catches sinks from the layer's output, sinks among the targets,
    text tokens as targets, the row restriction dropped."""
    vlm, B = testbed_vlm, batch.batch_size
    req, tap, rec = var_run
    hook = req.hooks[0]
    assert sorted(hook.attention_layers) == [1, 2, 3, 4] and req.rows == B
    image, prompt = image_keys(vlm, batch), batch.attention_mask.bool()
    pos = torch.arange(image.shape[1]).expand_as(image)
    row_start = torch.where(image, pos, -1).amax(1) + 1  # the first position after the image
    for layer in range(6):
        # the prompt tokens whose hidden state entering the layer (at prefill) has phi > tau; and, the
        # mistake, leaving it (= entering the next layer)
        sinks = (phi_by_hand(tap.calls[layer][0]["hidden"]) > 5.8) & prompt
        out_sinks = (phi_by_hand(tap.calls[min(layer + 1, 5)][0]["hidden"]) > 5.8) & prompt
        if layer in hook.attention_layers:
            assert torch.equal(hook.sinks[layer].cpu(), sinks), layer
            assert not torch.equal(out_sinks, sinks)
        for step, call in enumerate(tap.calls[layer]):
            valid = tap.masks[step]
            p = softmax(logits(vlm, layer, call), valid)
            plain = heads_out(p, call)
            if layer not in hook.attention_layers:
                assert_heads(call, plain, valid, (layer, step))
                continue
            tk = p.shape[-1]
            src, img = pad_to(sinks, B, tk), pad_to(image, B, tk)
            want = redistribute_by_hand(p, src, img & ~src, img, row_start)
            assert_heads(call, heads_out(want, call), valid, (layer, step))
            # the data tell the formula from its mistakes
            wrong = {
                "no edit": p,
                "sinks from the output": redistribute_by_hand(
                    p, pad_to(out_sinks, B, tk), img & ~pad_to(out_sinks, B, tk), img, row_start
                ),
                "sinks among the targets": redistribute_by_hand(p, src, img, img, row_start),
                "text tokens as targets": redistribute_by_hand(p, src, valid & ~src, img, row_start),
            }
            if step == 0:
                wrong["every row"] = redistribute_by_hand(p, src, img & ~src, img, torch.zeros_like(row_start))
            for name, alt in wrong.items():
                assert gap(call, heads_out(alt, call), valid) > 1e-4, (layer, step, name)
            if layer in rec.attention:
                got = rec.attention[layer][step]  # [B, H, Tq, N]
                rows = query_rows(valid, got.shape[2])
                for b in range(B):
                    exp = want[b][:, :, image[b].nonzero().flatten()].float()
                    torch.testing.assert_close(got[b][:, rows[b]], exp[:, rows[b]], **TOL)


def test_var_padding_is_never_a_sink(testbed_vlm, batch, var_run):
    """The testbed's padding positions carry a zero hidden state, so the hook is called here on the captured
    input of layer 1 with the padding positions overwritten by a sink token's hidden state: they still are
    no sinks, every real token's verdict is unchanged. Catches the attention mask dropped from the sink rule."""
    req, tap, _ = var_run
    hook = req.hooks[0]
    hidden = tap.calls[1][0]["hidden"].clone()
    prompt = batch.attention_mask.bool()
    assert not bool(prompt.all())
    sinks = (phi_by_hand(hidden) > 5.8) & prompt
    b, t = sinks.nonzero()[0].tolist()
    hidden[~prompt] = hidden[b, t].clone()
    assert bool((phi_by_hand(hidden)[~prompt] > 5.8).all())  # the padding now looks like a sink
    hook.layer_input(1, hidden)
    assert torch.equal(hook.sinks[1].cpu(), sinks)


# -------------------------------------------------------------------------------------------- PAINT


def test_paint_token_sets_and_their_positions_in_a_left_padded_batch(testbed_vlm, batch):
    """paint:preset=paper (alpha 0.7 local, beta 0.4 summary, every answer token): the CLS -> patch scores are
    the vision tower's attention (eager, summed over heads) of layer 0 and of layer n - 2 (whose output is
    LLaVA's feature layer -2), not the last; summary = the IQR outliers, local = the top quarter by layer 0
    minus summary; patch j is the j-th image token of each left-padded row; in every edited layer and call
    the last row's logits get z + 0.7 |z| on local and z + 0.4 |z| on summary positions. Catches the summary
    read from the last layer, a patch -> position map shifted by one or taken from another row."""
    vlm, B = testbed_vlm, batch.batch_size
    n = vlm.model.config.vision_config.num_hidden_layers
    assert n >= 3 and vlm.model.config.vision_feature_layer == -2
    tower = copy.deepcopy(vlm.model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(batch.pixel_values, output_attentions=True, output_hidden_states=True)
    att = out.attentions
    assert len(att) == n and len(out.hidden_states) == n + 1  # hidden_states[-2] is layer n - 2's output
    first, summary = (att[k][:, :, 0, 1:].sum(1) for k in (0, n - 2))
    got_first, got_summary = cls_attention(vlm, batch.pixel_values)
    torch.testing.assert_close(got_first, first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_summary, summary, rtol=1e-5, atol=1e-6)
    assert float((att[n - 1][:, :, 0, 1:].sum(1) - summary).abs().max()) > 1e-3  # the last layer differs
    # the sets by hand
    P = first.shape[1]
    n_local = math.ceil(0.25 * P)
    local_p, summary_p = torch.zeros(B, P, dtype=torch.bool), torch.zeros(B, P, dtype=torch.bool)
    for b in range(B):
        s = summary[b].double().numpy()
        q1, q3 = np.percentile(s, [25, 75])
        summary_p[b] = torch.from_numpy(s > q3 + 1.5 * (q3 - q1))
        order = np.argsort(-first[b].double().numpy(), kind="stable")
        f_sorted = first[b].double().numpy()[order]
        assert f_sorted[n_local - 1] > f_sorted[n_local]  # no tie at the cut
        local_p[b, torch.from_numpy(order[:n_local])] = True
    local_p &= ~summary_p
    assert bool(summary_p.any(-1).all()) and bool(local_p.any(-1).all())
    sel_local, sel_summary = select_tokens(first, summary, 0.25, 1.5)
    assert torch.equal(sel_local, local_p) and torch.equal(sel_summary, summary_p)
    # patch j -> the j-th image token of row b
    image = image_keys(vlm, batch)
    where = [image[b].nonzero().flatten() for b in range(B)]
    assert all(w.numel() == P for w in where) and len({int(w[0]) for w in where}) == B  # shifted by the padding

    def positions(patches, shift=0, row=None):
        m = torch.zeros_like(image)
        for b in range(B):
            m[b, where[b if row is None else row][patches[b]] + shift] = True
        return m

    local, summ = positions(local_p), positions(summary_p)
    req, tap, _ = run(vlm, batch, ["paint:preset=paper"], range(6))
    assert req.rows == B  # no guidance stream in the paper preset
    assert torch.equal(req.key_sets["paint.local"].cpu(), local)
    assert torch.equal(req.key_sets["paint.summary"].cpu(), summ)

    def boosted(z, loc, sm):
        tk = z.shape[-1]
        return boost_last_row(boost_last_row(z, pad_to(loc, B, tk), 0.7), pad_to(sm, B, tk), 0.4)

    for layer in range(6):
        for step, call in enumerate(tap.calls[layer]):
            valid = tap.masks[step]
            z = logits(vlm, layer, call)
            if layer == 0:
                assert_heads(call, heads_out(softmax(z, valid), call), valid, (layer, step))
                continue
            assert_heads(call, heads_out(softmax(boosted(z, local, summ), valid), call), valid, (layer, step))
            for loc, sm in (
                (positions(local_p, 1), positions(summary_p, 1)),  # the map shifted by one token
                (positions(local_p, row=0), positions(summary_p, row=0)),  # row 0's positions for every row
            ):
                assert gap(call, heads_out(softmax(boosted(z, loc, sm), valid), call), valid) > 1e-4, (layer, step)
