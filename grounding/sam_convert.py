"""Official-architecture SAM weights -> a transformers `SamModel` directory (`lucid sam to-hf`).

The two implementations hold the same tensors under different names (and transformers splits each
3-layer MLP into proj_in / layers / proj_out). `hf_key` is the renaming; `to_hf` writes a directory
`SamModel.from_pretrained` / `SamProcessor.from_pretrained` load, with the image processor set to the
model's frame (longest side = img_size, pad to img_size, masks at 4x the embedding grid). A test runs
the embedded tiny SAM through both backends and compares masks and scores.
"""

from __future__ import annotations

import re
from pathlib import Path

from grounding.sam_model import SamArchitecture

_RULES: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"\.norm(\d)\.", r".layer_norm\1."),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"neck\.0\.", "neck.conv1."),
    (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."),
    (r"neck\.3\.", "neck.layer_norm2."),
    (r"transformer\.norm_final_attn\.", "transformer.layer_norm_final_attn."),
    (r"output_upscaling\.0\.", "upscale_conv1."),
    (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.layers\.0\.", r"\1.proj_in."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.layers\.1\.", r"\1.layers.0."),
    (r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)\.layers\.2\.", r"\1.proj_out."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."),
    (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."),
    (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"point_embeddings\.", "point_embed."),
)
_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def hf_key(key: str) -> str:
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key)
    return key


def hf_config(arch: SamArchitecture):
    from transformers import SamConfig
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=arch.encoder_dim,
        output_channels=arch.prompt_dim,
        num_hidden_layers=arch.encoder_depth,
        num_attention_heads=arch.encoder_heads,
        image_size=arch.img_size,
        patch_size=arch.patch_size,
        mlp_dim=4 * arch.encoder_dim,
        use_rel_pos=arch.use_rel_pos,
        window_size=arch.window_size,
        global_attn_indexes=list(arch.global_attn_indexes),
        num_pos_feats=arch.prompt_dim // 2,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=arch.prompt_dim,
        image_size=arch.img_size,
        patch_size=arch.patch_size,
        mask_input_channels=arch.mask_in_chans,
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=arch.prompt_dim,
        mlp_dim=arch.decoder_mlp,
        num_hidden_layers=arch.decoder_depth,
        num_attention_heads=arch.decoder_heads,
        iou_head_hidden_dim=arch.prompt_dim,
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def hf_processor(arch: SamArchitecture):
    from transformers import SamImageProcessor, SamProcessor

    low = 4 * arch.embedding_size
    image_processor = SamImageProcessor(
        size={"longest_edge": arch.img_size},
        pad_size={"height": arch.img_size, "width": arch.img_size},
        mask_size={"longest_edge": low},
        mask_pad_size={"height": low, "width": low},
    )
    return SamProcessor(image_processor=image_processor)


def to_hf(state: dict, arch: SamArchitecture, out: str | Path) -> Path:
    """Write the official `state` dict as a transformers SAM directory; returns it."""
    from transformers import SamModel

    model = SamModel(hf_config(arch))
    mapped = {hf_key(k): v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
    mapped["shared_image_embedding.positional_embedding"] = state[_PE]
    mapped[
        hf_key(_PE).replace("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding")
    ] = state[_PE]
    mapped.pop(hf_key(_PE), None)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"SAM key mapping incomplete: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    out = Path(out)
    model.save_pretrained(out)
    hf_processor(arch).save_pretrained(out)
    return out
