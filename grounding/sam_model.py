"""Building an official-architecture SAM at any size from its keyword arguments.

`segment_anything.sam_model_registry` knows only vit_b / vit_l / vit_h. A small SAM (the embedded
testbed one) is the same stock modules (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
`TwoWayTransformer`, `Sam`) at other sizes; `SamArchitecture` holds those sizes and is saved beside the
weights (`sam_config.json`) so the model can be rebuilt before `load_state_dict`.

`decode_batched` is `MaskDecoder.predict_masks` for prompts on different images: the stock method
repeats one image embedding for every prompt; this one takes the embedding already gathered per prompt.
A test checks it against the stock method.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from grounding.sam_import import import_segment_anything

CONFIG_FILE = "sam_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class SamArchitecture:
    """Sizes of an official-architecture SAM. Defaults: the embedded testbed SAM (0.9 M parameters).

    Attributes:
        img_size: the square model frame (longest image side is resized to it).
        patch_size: ViT patch size; the image embedding is img_size / patch_size on a side.
        encoder_dim, encoder_depth, encoder_heads: the ViT image encoder.
        window_size, global_attn_indexes, use_rel_pos: ViT attention layout (0 = global everywhere).
        prompt_dim: the prompt / mask-decoder width (SAM's 256).
        decoder_depth, decoder_heads, decoder_mlp: the two-way transformer.
        mask_in_chans: hidden channels of the mask-prompt downscaler.
    """

    img_size: int = 128
    patch_size: int = 8
    encoder_dim: int = 96
    encoder_depth: int = 3
    encoder_heads: int = 3
    window_size: int = 0
    global_attn_indexes: tuple[int, ...] = ()
    use_rel_pos: bool = False
    prompt_dim: int = 96
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp: int = 384
    mask_in_chans: int = 16

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SamArchitecture:
        data = dict(data)
        data["global_attn_indexes"] = tuple(data.get("global_attn_indexes", ()))
        return cls(**data)


def build_sam(arch: SamArchitecture) -> torch.nn.Module:
    """A randomly initialised `segment_anything.modeling.Sam` with these sizes."""
    sa = import_segment_anything()
    m = sa.modeling
    emb = arch.embedding_size
    encoder = m.ImageEncoderViT(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.encoder_dim,
        depth=arch.encoder_depth,
        num_heads=arch.encoder_heads,
        mlp_ratio=4,
        out_chans=arch.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=arch.use_rel_pos,
        window_size=arch.window_size,
        global_attn_indexes=arch.global_attn_indexes,
    )
    prompt = m.PromptEncoder(
        embed_dim=arch.prompt_dim,
        image_embedding_size=(emb, emb),
        input_image_size=(arch.img_size, arch.img_size),
        mask_in_chans=arch.mask_in_chans,
    )
    decoder = m.MaskDecoder(
        num_multimask_outputs=3,
        transformer=m.TwoWayTransformer(
            depth=arch.decoder_depth,
            embedding_dim=arch.prompt_dim,
            mlp_dim=arch.decoder_mlp,
            num_heads=arch.decoder_heads,
        ),
        transformer_dim=arch.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=arch.prompt_dim,
    )
    return m.Sam(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def save_sam(sam: torch.nn.Module, arch: SamArchitecture, out: str | Path, extra: dict | None = None) -> Path:
    """Write `model.safetensors` + `sam_config.json` (the architecture, plus `extra` keys) into `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in sam.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"architecture": arch.to_json(), **(extra or {})}, indent=2) + "\n")
    return out


def load_sam_dir(path: str | Path) -> tuple[torch.nn.Module, SamArchitecture]:
    """Rebuild and load a SAM written by `save_sam`."""
    from safetensors.torch import load_file

    path = Path(path)
    arch = SamArchitecture.from_json(json.loads((path / CONFIG_FILE).read_text())["architecture"])
    sam = build_sam(arch)
    sam.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return sam.eval(), arch


def decode_batched(
    decoder: torch.nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` with one image embedding per prompt.

    Args:
        image_embeddings: [N, C, h, w], row i the embedding of prompt i's image.
        image_pe: [1, C, h, w].
        sparse: [N, T, C]; dense: [N, C, h, w].

    Returns:
        low-res mask logits [N, 1 + multimask, 4h, 4w] and IoU predictions [N, 1 + multimask].
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None].expand(sparse.shape[0], -1, -1), sparse), dim=1)
    src = image_embeddings + dense
    pos = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    iou_out, mask_out = hs[:, 0, :], hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    up = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = up.shape
    masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_out)
