"""Conditioning: what a model is given for a prompt, and for the other branch of classifier-free guidance.

Every model is called as ``model(x, t, cond)`` with ``cond`` either ``(B, L)`` token ids of a closed vocabulary
(the shapes world; a diffusers adapter maps them through its ``TextConditioner``) or ``(B, L, D)`` text
embeddings (a real model's own text encoder, computed once per prompt by ``vidpo.stages.prompts``). The stages
never build conditions themselves; they ask the run's ``Conditioning``:

  ``for_prompts(ids)``          the condition rows of these prompt ids
  ``for_records(records)``      the condition rows of these pairs (by their ``prompt_id``)
  ``negative(ids, cond)``       the unconditional branch of classifier-free guidance: the embeddings of each
                                prompt's negative prompt, or None for the model's own null condition
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vidpo.data.domains import ShapesDomain
from vidpo.data.pairs import PairRecord


class Conditioning:
    """The interface (module docstring)."""

    def for_prompts(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def for_records(self, records: Sequence[PairRecord]) -> torch.Tensor:
        missing = [r.pair_id for r in records if not r.prompt_id]
        if missing:
            raise ValueError(f"pairs {missing[:3]} have no prompt_id: they were not generated from this run's "
                             f"prompt set")
        return self.for_prompts([r.prompt_id for r in records])

    def negative(self, prompt_ids: Sequence[str], cond: torch.Tensor) -> Optional[torch.Tensor]:
        return None


class TokenConditioning(Conditioning):
    """The shapes world's condition tokens: ``(B, 3)`` ids of colour, shape and direction (0 is the null)."""

    def __init__(self, domain: ShapesDomain):
        self.domain = domain

    def for_prompts(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        return self.domain.world.tokens(self.domain.condition_ids(prompt_ids))

    def for_records(self, records: Sequence[PairRecord]) -> torch.Tensor:
        # Pairs written before prompt ids existed carry only their structured condition.
        return self.domain.world.tokens(torch.tensor([r.cond_ids for r in records], dtype=torch.long))


class EmbeddingConditioning(Conditioning):
    """Text embeddings of a prompt-embedding cache (``vidpo.stages.prompts.PromptEmbeddings``): ``(B, L, D)``,
    zero past each prompt's tokens; the negative branch is each prompt's negative prompt."""

    def __init__(self, embeddings, dtype: torch.dtype = torch.float32):
        self.embeddings = embeddings
        self.dtype = dtype

    def for_prompts(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        emb, _ = self.embeddings.get(list(prompt_ids))
        return emb.to(self.dtype)

    def negative(self, prompt_ids: Sequence[str], cond: torch.Tensor) -> torch.Tensor:
        emb, _ = self.embeddings.negative(list(prompt_ids))
        return emb.to(self.dtype)
