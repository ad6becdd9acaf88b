"""The parts a run's stages share, built once from the recipe: domain, conditioning, VAE, real clips.

``prepare_run(cfg, run_dir)`` checks everything the run will need before any stage does work:

* the shapes world (no ``prompts.path``): its conditions are the prompts, its tokens the conditioning, its
  "VAE" the identity (the model works on pixels), its renderer the real clips;
* a prompt file with a released model directory (``model.path``, ``model.kind`` wan | cogvideox): the prompt
  file is read and checked in full, the directory is checked for the parts the recipe needs (a directory of
  another family, or one without ``vae/``, fails here), every prompt and negative prompt is embedded once by
  the model's own text encoder (``vidpo.stages.prompts``; the encoder is released right after), the VAE is
  loaded for decoding, and the prompts' reference clips are encoded when the recipe starts anything from real
  clips (``vidpo.stages.real_clips``).

The toy world's stages see exactly the parts they saw before this existed, so its figures do not move.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.data.domains import Domain, ShapesDomain
from vidpo.models.pipeline_dir import ModelDirectoryError, PipelineDirectory
from vidpo.models.registry import open_pipeline
from vidpo.models.vae import IdentityVAE, VideoVAE, vae_facts
from vidpo.stages.prompts import embed_prompts
from vidpo.stages.real_clips import encode_prompt_clips, needs_real_clips
from vidpo.training.conditioning import Conditioning, EmbeddingConditioning, TokenConditioning
from vidpo.training.modeling import DTYPES, build_domain, loads_from_directory, pick_device


@dataclass
class RunParts:
    domain: Domain
    conditioning: Conditioning
    vae: VideoVAE
    """Latent geometry and decoding (the identity for a pixel-space model)."""
    pipeline: Optional[PipelineDirectory] = None
    """The released model directory, for a prompt-file run."""
    real_latents: Optional[Callable] = None
    """``(prompt_ids, generator) -> latents`` of the prompts' real clips (structural pairs); None: none."""
    real_latents_of_records: Optional[Callable] = None
    """``(records, generator) -> latents`` of the pairs' prompts' real clips (the real-video regularizer)."""


def open_model_dir(cfg: RunConfig, *parts: str) -> PipelineDirectory:
    """``model.path`` checked as a release of ``model.kind`` with ``parts``; a problem is a ConfigError."""
    if not loads_from_directory(cfg) or not cfg.model.path:
        raise ConfigError("a prompt-file run (prompts.path) needs a released diffusers model: model.kind wan | "
                          "cogvideox and model.path its directory (model_index.json, transformer/, vae/, ...)")
    try:
        return open_pipeline(cfg.model.kind, resolve_path(cfg.model.path), require=parts)
    except ModelDirectoryError as exc:
        raise ConfigError(f"model.path: {exc}") from None


def prepare_run(cfg: RunConfig, run_dir: str | Path, *, device: Optional[torch.device] = None, rank: int = 0,
                world_size: int = 1) -> RunParts:
    """The run's parts (module docstring). Under torchrun (``world_size`` > 1, process group up) every rank
    embeds its share of the prompts and encodes its share of the clips, and all of them read the whole."""
    domain = build_domain(cfg)
    if isinstance(domain, ShapesDomain):
        world = domain.world

        def real_of_records(records, g):
            return world.render(torch.tensor([r.cond_ids for r in records], dtype=torch.long), g, corrupt=False).clips
        vae = IdentityVAE()
        return RunParts(domain, TokenConditioning(domain), vae,
                        real_latents=lambda ids, g: vae.encode(domain.real_clips(ids, g)),
                        real_latents_of_records=real_of_records)
    pipe = open_model_dir(cfg, "vae", "text_encoder", "tokenizer")
    device = device or pick_device()
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    text = pipe.text_encoder(device, compute, max_length=cfg.prompts.max_sequence_length)
    embeddings = embed_prompts(cfg, domain.all_prompts, text, run_dir, rank=rank, world_size=world_size)
    del text
    gc.collect()
    vae = pipe.vae(device, compute, tiling=cfg.generate.vae_tiling)
    parts = RunParts(domain, EmbeddingConditioning(embeddings, dtype=DTYPES[cfg.model.dtype]), vae, pipe)
    if needs_real_clips(cfg):
        clips = encode_prompt_clips(cfg, domain, pipe, run_dir)
        parts.real_latents, parts.real_latents_of_records = clips.for_prompts, clips.for_records
    return parts


def latent_frames_of(cfg: RunConfig) -> Optional[int]:
    """The latent frames of a prompt-file run's videos, from its VAE's config alone (what a parallel layout
    must divide before any weight is loaded); None for the shapes world (its frames are its pixels)."""
    if not cfg.prompts.path:
        return None
    pipe = open_model_dir(cfg, "vae")
    _, _, temporal = vae_facts(pipe.path / "vae")
    return 1 + ((cfg.generate.frames or cfg.world.frames) - 1) // temporal
