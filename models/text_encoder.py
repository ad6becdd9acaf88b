"""A model family's text encoder, loaded from local directories: a transformers encoder (T5 / UMT5 encoder, or
any model with ``last_hidden_state``) and its tokenizer. ``encode(prompts)`` gives the last hidden state and the
attention mask, in one of the two conventions of the diffusers pipelines:

  masked (Wan, the default)  WanPipeline: prompts cleaned (``prompt_clean``), the encoder called WITH the attention
                             mask, the hidden states zeroed past each prompt's tokens;
  unmasked (CogVideoX)       CogVideoXPipeline: the encoder called WITHOUT a mask on the padded ids, the pad
                             positions' hidden states kept (the transformer was trained on them).

Nothing is downloaded: hub access is switched off before loading (``offline_hub``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


def offline_hub() -> None:
    """Switch the hub off for diffusers / transformers (every model is a local directory) and quiet them."""
    # Everything is loaded from local directories; never let a typo turn into a download attempt.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
    # Their per-load progress bars and tips would bury vidpo's own progress line.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging
    except ImportError as exc:
        raise ImportError(f"real video models need diffusers and transformers (pip install 'vidpo[hf]'): {exc}") \
            from None
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


class TextEncoder:
    """A transformers encoder (T5 / UMT5 encoder, or any model with ``last_hidden_state``) and its tokenizer
    from local directories; ``encode(captions)`` -> ``(emb float32 (B, L, D), mask bool (B, L))`` with
    ``L = max_length``. ``masked``: the convention (module docstring), True for Wan, False for CogVideoX."""

    def __init__(self, directory: Path, tokenizer_dir: Path, device: torch.device, dtype: torch.dtype,
                 max_length: int, *, masked: bool = True):
        offline_hub()
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [""])[0]
        cls = getattr(transformers, arch, None) if arch.endswith("EncoderModel") else None
        if cls is None:
            cls = {"t5": transformers.T5EncoderModel, "umt5": getattr(transformers, "UMT5EncoderModel", None),
                   "mt5": getattr(transformers, "MT5EncoderModel", None)}.get(config.model_type) or transformers.AutoModel
        self.model = cls.from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.max_length, self.class_name = device, int(max_length), cls.__name__
        self.masked = bool(masked)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        captions = [clean_prompt(c) for c in captions] if self.masked else list(captions)
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device).bool()
        ids = tokens["input_ids"].to(self.device)
        if not self.masked:
            return self.model(input_ids=ids).last_hidden_state.float().cpu(), mask.cpu()
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return (hidden.float() * mask[..., None]).cpu(), mask.cpu()


def clean_prompt(text: str) -> str:
    """WanPipeline's ``prompt_clean`` (ftfy when installed, HTML unescaping, whitespace collapsed)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)
