"""Chat messages + images -> token ids and pixels, through the family's real processor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import detect_family, resolve_model_dir
from .families import PixelInputs, family_for
from .sampling import GENERATION_CONFIG_FIELDS


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [N] long
    mm_token_type_ids: Optional[torch.Tensor]  # [N] (0 text, 1 image), None without images
    pixels: list[PixelInputs] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


class PromptBuilder:
    """Applies the checkpoint's chat template and processor. Light: no model weights."""

    def __init__(self, model: str | Path):
        from transformers import AutoConfig, AutoProcessor

        model_dir = resolve_model_dir(model)
        detect_family(model_dir)  # CheckpointError for a missing/corrupt config or unsupported model_type
        config = AutoConfig.from_pretrained(model_dir)
        self.family = family_for(config)
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self._read_generation_config(model_dir, config)  # eos_token_ids, sampling_defaults
        # Text that spells a control token (<|im_start|>, <start_of_turn>, ...) would become that
        # token: a user could forge turns or image slots. Control tokens: the tokenizer's named
        # special tokens and the special tokens its chat template writes (not every added token:
        # real Gemma-3 has thousands, <unused0>... among them). Longest first, to name the whole.
        template = self.processor.chat_template or self.tokenizer.chat_template or ""
        template = " ".join(template.values()) if isinstance(template, dict) else template
        written = {t.content for t in self.tokenizer.added_tokens_decoder.values()
                   if t.special and t.content in template}
        self.control_tokens = sorted(written | set(self.tokenizer.all_special_tokens), key=len, reverse=True)
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()))

    def control_token_in(self, text: str) -> Optional[str]:
        return next((t for t in self.control_tokens if t in text), None)

    def min_tokens(self, texts: list[str]) -> int:
        """A lower bound on the tokens these texts become, without tokenizing them: no token
        covers more characters than the longest in the vocabulary, and Unicode normalisation
        merges at most a few characters into one (hence the margin of 4)."""
        return sum(map(len, texts)) // (4 * self.max_token_chars)

    def _read_generation_config(self, model_dir: Path, config) -> None:
        """End-of-answer ids, and the sampling values the checkpoint itself sets in
        generation_config.json (not transformers' defaults): real Qwen3-VL asks for top_k 20,
        top_p 0.8, temperature 0.7; Gemma-3 for top_k 64, top_p 0.95. vLLM applies them to what a
        request leaves unset (its `--generation-config auto`), and so does the Ingress."""
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json: what config.json says, as transformers and vLLM do
            gen = GenerationConfig.from_model_config(config)
        eos = gen.eos_token_id
        ids = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        self.eos_token_ids = tuple(sorted(i for i in ids if i is not None))
        set_here = gen.to_diff_dict()
        self.sampling_defaults = {k: set_here[k] for k in GENERATION_CONFIG_FIELDS if set_here.get(k) is not None}

    def render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build(self, messages: list[dict], images: list | None = None) -> Prompt:
        """messages in HF chat format: content a string or parts {"type": "text"|"image"}."""
        images = images or []
        text = self.render(messages)
        batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = batch["input_ids"][0]
        types = batch.get("mm_token_type_ids", batch.get("token_type_ids"))
        pixels = self.family.split_pixels(batch) if images else []
        return Prompt(ids, types[0] if (types is not None and images) else None, pixels)
