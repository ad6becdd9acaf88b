"""Real clips of a prompt set, as the model's VAE latents: what structural pairs and the real-video regularizer
start from.

A prompt of a prompt file may name a reference clip (JSONL ``"clip"``). StructuralDPO re-generates both videos
of a pair from that clip's latents by SDEdit, and IPO's regularizer (``pref.sft_source: real``) fits the policy
to it. ``encode_prompt_clips`` encodes every such clip once with the model's own VAE and text encoder through
``vidpo cache`` (``vidpo.stages.cache``: decoded at the run's ``generate.fps``, ``frames``, ``height`` and
``width``, centre-cropped, resumable, rank-sliced) into ``RUN_DIR/clips/``, with the prompt's id as the clip id;
``RealClipLatents`` reads them back by prompt id.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch

from vidpo.config import ConfigError, RunConfig
from vidpo.data.domains import PromptFileDomain
from vidpo.data.latents import LatentShardDataset
from vidpo.data.pairs import PairRecord
from vidpo.models.pipeline_dir import PipelineDirectory
from vidpo.stages.cache import run_cache
from vidpo.utils import atomic

CLIPS_DIR = "clips"


class RealClipLatents:
    """The cached latents of the prompts' clips, by prompt id: ``get(ids)`` -> (n, C, T, H, W) float32."""

    def __init__(self, directory: str | Path):
        self.dataset = LatentShardDataset(directory)
        self._row = {clip_id: i for i, clip_id in enumerate(self.dataset.clip_ids)}

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._row

    def get(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        missing = [p for p in prompt_ids if p not in self._row]
        if missing:
            raise ConfigError(f"prompts {missing[:3]} have no usable reference clip (a 'clip' in the prompt file "
                              f"that decodes): structural pairs and the real-video regularizer need one")
        return self.dataset.read([self._row[p] for p in prompt_ids])["latents"]

    def for_prompts(self, prompt_ids: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """``get`` in the signature of ``generate_pairs``'s ``real_latents`` (the clips are fixed: no draw)."""
        return self.get(prompt_ids)

    def for_records(self, records: Sequence[PairRecord], generator: torch.Generator) -> torch.Tensor:
        """``get`` of the records' prompts, in the signature of ``PreferenceObjective``'s ``real_latents``."""
        return self.get([r.prompt_id for r in records])


def encode_prompt_clips(cfg: RunConfig, domain: PromptFileDomain, pipe: PipelineDirectory,
                        run_dir: str | Path) -> RealClipLatents:
    """Encode every prompt's clip into ``run_dir/clips`` (module docstring) and return the reader."""
    out = Path(run_dir) / CLIPS_DIR
    prompts = [p for p in domain.all_prompts if p.clip is not None]
    if not prompts:
        raise ConfigError(f"{domain.all_prompts.source}: no prompt names a 'clip', but generate.mode=structural "
                          f"and pref.sft_source real / both need the reference clips of the prompts")
    manifest = out / "manifest.jsonl"
    atomic.write_text(manifest, "".join(json.dumps({"clip_id": p.id, "path": str(p.clip), "caption": p.text}) + "\n"
                                        for p in prompts))
    pipe.require("vae", "text_encoder", "tokenizer")
    ccfg = copy.deepcopy(cfg)
    c = ccfg.cache
    c.manifest, c.vae = str(manifest), str(pipe.path / "vae")
    c.text_encoder, c.tokenizer = str(pipe.path / "text_encoder"), str(pipe.path / "tokenizer")
    c.fps, c.frames, c.height, c.width = domain.fps, domain.frames, domain.height, domain.width
    c.text_max_length = pipe.text_max_length
    run_cache(ccfg, out / "latents")
    return RealClipLatents(out / "latents")


def needs_real_clips(cfg: RunConfig) -> bool:
    """Whether the recipe starts anything from real clips: structural pairs or the real-video regularizer."""
    return cfg.generate.mode == "structural" or (cfg.pref.sft_weight > 0 and cfg.pref.sft_source in ("real", "both"))
