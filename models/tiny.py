"""Offline checkpoints with random weights, for tests ('tiny') and benchmarks ('bench').

Each directory loads through the real code paths: `<Family>ForConditionalGeneration.from_pretrained`
and `AutoProcessor.from_pretrained`, with HF_HUB_OFFLINE=1. The tokenizer is a byte-level BPE
trained here with the `tokenizers` library, carrying the family's real special tokens and a chat
template in the family's format; the image processor is the family's real one.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
GEMMA_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]

# Same shape of template as the real ones (role markers, image placeholder where the part is).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is it that was for on are with as they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which "
    "do their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find any new work part take get place made live where after "
    "back little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father head stand own page "
    "should country found answer school grow study still learn plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far sea draw left "
    "late run while press close night real life few north open seem together next white children begin "
    "red blue green yellow circle square triangle color shape image left right top bottom count"
).split()


def _corpus(n_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "da", "pe", "qu", "zo", "fa", "gi", "ho"]
    invented = ["".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(4000)]
    lines = []
    for _ in range(n_words // 12):
        words = [rng.choice(_WORDS) if rng.random() < 0.7 else rng.choice(invented) for _ in range(12)]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "?", "!", ":"]))
    return lines


def train_tokenizer(family: str, vocab_size: int, seed: int = 0, corpus=None):
    """Byte-level BPE with the family's special tokens, eos and chat template, trained on `corpus`
    (an iterable of strings; default: generated English-like text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = QWEN_SPECIALS if family == "qwen3-vl" else GEMMA_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(200_000, seed) if corpus is None else corpus, trainer=trainer)
    if family == "qwen3-vl":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            chat_template=QWEN_CHAT_TEMPLATE,
            extra_special_tokens={
                "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
            },
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        chat_template=GEMMA_CHAT_TEMPLATE,
        extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        },
    )


# Text shapes. 'bench' is fixed by the performance targets (see README); 'tiny' runs in seconds;
# '8b' is Qwen3-VL-8B's (8.8B parameters, 17.5 GB in bf16: for a GPU, bench/engine.py).
_TEXT = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "bench": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
}
_VISION = {
    "tiny": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, deepstack_visual_indexes=[0, 1],
                 num_position_embeddings=576),
    "bench": dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, deepstack_visual_indexes=[1, 2, 3],
                  num_position_embeddings=576),
    "8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24],
               num_position_embeddings=2304),
}
_VOCAB = {"tiny": 1024, "bench": 6144, "8b": 6144}
# The real 8B's embedding and LM head rows (151936) are part of its cost; the tokenizer needs fewer.
_PADDED_VOCAB = {"8b": 151936}
# Wider random weights make tiny outputs depend on the context, so token-exact tests mean something.
_INIT = {"tiny": 0.08, "bench": 0.02, "8b": 0.02}


def qwen3_vl_config(tok, text: dict, vision: dict, *, max_positions: int, rope_theta: float, init: float,
                    vocab_size: int = 0, mrope: Optional[list[int]] = None, stop_ids: bool = False):
    """A Qwen3-VL config of the given text / vision shapes around a locally trained tokenizer (the
    tiny checkpoints and the trained models share this recipe). stop_ids: set eos / pad ids."""
    from transformers import Qwen3VLConfig

    half = text["head_dim"] // 2
    mrope = mrope or [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # [16,24,24] at 128
    ids = tok.convert_tokens_to_ids
    stops = dict(eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")) if stop_ids else {}
    return Qwen3VLConfig(
        text_config=dict(
            **text, vocab_size=max(len(tok), vocab_size), max_position_embeddings=max_positions,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope,
                             "mrope_interleaved": True},
            tie_word_embeddings=False, initializer_range=init, **stops,
        ),
        vision_config=dict(**vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3, out_hidden_size=text["hidden_size"]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False, **stops,
    )


def gemma3_config(tok, text: dict, vision: dict, *, max_positions: int, window: int, init: float,
                  mm_tokens: int, text_stops_at_end_of_turn: bool = False):
    """A Gemma-3 config of the given shapes (every 6th layer and the last global, the rest sliding)."""
    from transformers import Gemma3Config

    n = text["num_hidden_layers"]
    ids = tok.convert_tokens_to_ids
    stops = [ids("<eos>"), ids("<end_of_turn>")]
    return Gemma3Config(
        text_config=dict(
            **text, vocab_size=len(tok), max_position_embeddings=max_positions, sliding_window=window,
            query_pre_attn_scalar=text["head_dim"], rms_norm_eps=1e-6,
            layer_types=["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
                         for i in range(n)],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            tie_word_embeddings=False, initializer_range=init, pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"),
            eos_token_id=stops if text_stops_at_end_of_turn else stops[0],
        ),
        vision_config=dict(**vision, model_type="siglip_vision_model", layer_norm_eps=1e-6),
        mm_tokens_per_image=mm_tokens,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False,
        pad_token_id=ids("<pad>"), bos_token_id=ids("<bos>"), eos_token_id=stops,
    )


def processor(family: str, tok, config, longest_edge: int):
    """The real processor of the family around `tok`; Qwen3-VL resizes images to at most
    `longest_edge` pixels, Gemma-3 to its vision tower's square."""
    if family == "qwen3-vl":
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        size_cfg = {"shortest_edge": 32 * 32, "longest_edge": longest_edge}
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size_cfg,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
        video = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=size_cfg)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                chat_template=QWEN_CHAT_TEMPLATE)
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    side = config.vision_config.image_size
    image = Gemma3ImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=image, tokenizer=tok, chat_template=GEMMA_CHAT_TEMPLATE,
                           image_seq_length=config.mm_tokens_per_image)


def _qwen_config(size: str, tok):
    # The 8B shape takes the real checkpoint's mRoPE sections, and its vocabulary rows.
    return qwen3_vl_config(tok, _TEXT[size], _VISION[size], max_positions=8192, rope_theta=5_000_000.0,
                           init=_INIT[size], vocab_size=_PADDED_VOCAB.get(size, 0),
                           mrope=[24, 20, 20] if size == "8b" else None)


def _gemma_config(size: str, tok):
    vision = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=64, patch_size=8)
              if size == "tiny" else
              dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   image_size=448, patch_size=14))
    return gemma3_config(tok, _TEXT[size], vision, max_positions=8192, window=8 if size == "tiny" else 512,
                         init=_INIT[size], mm_tokens=16 if size == "tiny" else 256)


def _processor(family: str, size: str, tok, config):
    # Tests keep images small; the bench shape takes a 448x448 or 896x896 image whole.
    return processor(family, tok, config, 128 * 128 if size == "tiny" else 1024 * 1024)


def _readable_lm_head(model, tok) -> None:
    """Random weights rarely emit readable text: zero the LM-head rows of special tokens and
    lone bytes so greedy decoding yields whole, decodable words."""
    vocab = tok.get_vocab()
    special = set(tok.all_special_ids)
    rows = [i for t, i in vocab.items() if i in special or len(t) == 1]
    with torch.no_grad():
        model.lm_head.weight[rows] = 0
        model.lm_head.weight[len(tok):] = 0  # padding rows past the tokenizer (8b)


def make_tiny(family: str, size: str, out_dir: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Build and save a random checkpoint; `device` is where the weights are drawn (the 8B shape
    is drawn in bf16 on a GPU: in float32 on a CPU it would take 35 GB and minutes)."""
    from transformers import Gemma3ForConditionalGeneration, Qwen3VLForConditionalGeneration

    if family not in ("qwen3-vl", "gemma3"):
        raise ValueError(f"unknown family {family!r}; choose qwen3-vl or gemma3")
    if size not in _TEXT:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(_TEXT)}")
    if size == "8b" and family != "qwen3-vl":
        raise ValueError("the 8b shape is Qwen3-VL-8B's; use qwen3-vl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(family, _VOCAB[size], seed)
    config = _qwen_config(size, tok) if family == "qwen3-vl" else _gemma_config(size, tok)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3-vl" else Gemma3ForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        model = (cls._from_config(config, dtype=torch.bfloat16) if size == "8b" else cls(config)).eval()
    if family == "gemma3":  # HF initialises the projector to zeros; random keeps images visible
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.05)
    _readable_lm_head(model, tok)
    model.generation_config.do_sample = False
    if size == "bench":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    _processor(family, size, tok, config).save_pretrained(out)
    return out
