"""Building blocks of the embedded tiny LLaVA: tokenizer, processor, chat template, config.

Everything here produces ordinary transformers objects (`PreTrainedTokenizerFast`,
`CLIPImageProcessor`, `LlavaProcessor`, `LlavaConfig`), so the saved checkpoint loads with
`AutoProcessor.from_pretrained(dir)` and `LlavaForConditionalGeneration.from_pretrained(dir)` like any
llava-hf checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from testbed.world.language import training_corpus

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"

#: LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), as a chat template
#: that takes llava-hf style messages (content: str, or a list of {"type": "image"|"text"} parts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


#: The vocabulary cap each language version's tokenizer was fitted with (the trainer stops earlier when no
#: pair is left to merge: 384 tokens for v1, 575 for v2, and every word of v3 stays one token).
VOCAB_SIZES = {"v1": 560, "v2": 600, "v3": 1000}


def build_tokenizer(vocab_size: int | None = None, language: str = "v3") -> PreTrainedTokenizerFast:
    """A byte-level BPE fitted on the testbed language (`training_corpus(language)`): any text encodes
    (no unknown words), the testbed's words and every box coordinate 0..100 (v2 on) are single tokens, and
    decoding is exact. `language="v1"` rebuilds the committed checkpoint's tokenizer."""
    if vocab_size is None:
        vocab_size = VOCAB_SIZES[language]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(language), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    return fast


@dataclass(frozen=True)
class TinyLlavaShape:
    """Architecture of the embedded model. Defaults are the committed checkpoint's (v1: 96 px, patch 8,
    12x12 = 144 image tokens); `TinyLlavaShape.v3()` is the v3 recipe's (128 px, patch 8, 16x16 = 256)."""

    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped-query attention, so the seam is exercised with GQA
    text_mlp: int = 384

    @classmethod
    def v1(cls) -> TinyLlavaShape:
        """The committed checkpoint's shape (and the v2 recipe's)."""
        return cls()

    @classmethod
    def v3(cls) -> TinyLlavaShape:
        """More patches per object: 128 px at patch 8, a 16x16 grid of 256 image tokens; same widths."""
        return cls(image_size=128)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(shape: TinyLlavaShape, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=shape.grid * shape.grid,
        tie_word_embeddings=False,
    )


def build_processor(shape: TinyLlavaShape, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
