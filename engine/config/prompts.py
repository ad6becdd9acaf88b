"""The prompt set of a real text-to-video model (``prompts``): the prompt file, its held-out split, the
default negative prompt, and how the model's text encoder embeds every prompt once (``vidpo.stages.prompts``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vidpo.config.choices import StorageDtype
from vidpo.config.fields import Problem, Problems, Section, choice


@dataclass
class PromptsConfig(Section):
    """Prompts of a real model (vidpo.data.prompts) and their text-embedding cache (vidpo.stages.prompts)."""

    path: Optional[str] = None
    """Prompt file: .txt (one prompt per line; id = "p" + the first 16 hex digits of the sha1 of the text) or
    .jsonl ({"id", "prompt", "negative_prompt"?, "clip"?, "split"?} per line; clip relative to the file).
    Read and checked in full before any model work; a bad line is an error naming file:line."""

    heldout_fraction: float = 0.1
    """Share of prompts held out from training for evaluation, in [0, 1). A prompt is held out when a hash of
    its id is below it, so adding prompts never moves an existing one across the split; a JSONL "split"
    key ("train" / "heldout") overrides it per prompt."""

    negative_prompt: str = ""
    """Negative prompt of every prompt that has none of its own (classifier-free guidance's unconditional
    branch). Empty by default, as the diffusers pipelines do; Wan's own releases use a long Chinese negative
    prompt (listing e.g. overexposure, static frames, blur, extra fingers): set it here to match them."""

    max_sequence_length: Optional[int] = None
    """Tokens per prompt embedding (padded past the prompt, or truncated). None: the model's own (the
    release's text encoder as its pipeline sets it: Wan 512, CogVideoX 226, vidpo.models.pipeline_dir).
    When set, the text encoder is built with it."""

    cache: Optional[str] = None
    """Directory of cached prompt embeddings shared across runs: each prompt set + encoder + length + dtype
    gets its own subfolder (named by a digest of those settings), reused by any run with the same ones.
    None: embeddings go inside the run's own directory."""

    batch_size: int = 16
    """Prompts per text-encoder forward."""

    shard_size: int = 256
    """Prompts per embedding shard; a rerun skips complete shards, and rank r of N takes shards r, r+N, ..."""

    dtype: str = choice("bfloat16", StorageDtype)
    """Storage dtype of the embeddings (the encoder computes in float32 on CPU, bf16 on GPU)."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.check(0.0 <= self.heldout_fraction < 1.0, "heldout_fraction",
                f"must be in [0, 1), got {self.heldout_fraction}")
        p.check(self.max_sequence_length is None or self.max_sequence_length >= 1, "max_sequence_length",
                f"must be None or >= 1, got {self.max_sequence_length!r}")
        p.at_least(self, 1, "batch_size", "shard_size")
        return p
