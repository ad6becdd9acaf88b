"""Building a run's parts from its config: device, world, policy model, precision.

One place decides how a recipe becomes objects, so ``train``, ``sample``, ``eval``, ``generate`` and the
pipeline all build the same model the same way (and a checkpoint's ``config.yaml`` rebuilds it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.data.domains import Domain, PromptFileDomain, ShapesDomain, shapes_world
from vidpo.data.latents import latent_info
from vidpo.data.segments import segment_ids as make_segment_ids
from vidpo.models.adapters import CONDITIONER_FILE, TextConditioner, transformer_dir
from vidpo.models.dit import build_dit, dit_config
from vidpo.models.pipeline_dir import is_pipeline_dir
from vidpo.models.registry import load_adapter, model_spec, open_pipeline
from vidpo.models.vae import VideoVAE
from vidpo.training import checkpoint as ckpt
from vidpo.training.conditioning import Conditioning, EmbeddingConditioning, TokenConditioning
from vidpo.utils.seeding import derive_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def loads_from_directory(cfg: RunConfig) -> bool:
    """Whether the recipe's model family loads from a model directory (a diffusers adapter in the registry) rather
    than being built from a preset and initialised from the run's seed (the DiT)."""
    return model_spec(cfg.model.kind).adapter is not None


def pick_device(requested: Optional[str] = None) -> torch.device:
    """CUDA when present (unless VIDPO_DEVICE / ``requested`` says otherwise), else CPU."""
    requested = requested or os.environ.get("VIDPO_DEVICE")
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_world(cfg: RunConfig):
    return shapes_world(cfg.world)


def build_domain(cfg: RunConfig, world=None) -> Domain:
    """The run's domain: the prompt file of ``prompts.path`` (videos of ``generate.frames / height / width /
    fps``), else the shapes world (``vidpo.data.domains``)."""
    if not cfg.prompts.path:
        return ShapesDomain(world if world is not None else build_world(cfg))
    g = cfg.generate
    return PromptFileDomain.from_file(resolve_path(cfg.prompts.path), heldout_fraction=cfg.prompts.heldout_fraction,
                                      fps=g.fps if g.fps is not None else cfg.world.fps,
                                      frames=g.frames or cfg.world.frames, height=g.height or cfg.world.height,
                                      width=g.width or cfg.world.width)


def build_conditioning(cfg: RunConfig, domain: Domain, embeddings=None) -> Conditioning:
    """Token ids for the shapes world; for a prompt file, the prompt-embedding cache ``embeddings``
    (``vidpo.stages.prompts.PromptEmbeddings``), in the model's dtype."""
    if isinstance(domain, ShapesDomain):
        return TokenConditioning(domain)
    if embeddings is None:
        raise ConfigError("a prompt-file run needs its prompt embeddings: build the run's parts with "
                          "vidpo.stages.parts.prepare_run (vidpo run / generate / train do)")
    return EmbeddingConditioning(embeddings, dtype=DTYPES[cfg.model.dtype])


def dit_config_for(cfg: RunConfig, world):
    in_channels, cond_vocab_size, cond_dim = 3, None, 0
    if cfg.data.source == "latents":  # the cache's index sets latent channels and text width
        info = latent_info(resolve_path(cfg.data.shards))
        in_channels, cond_vocab_size, cond_dim = info.channels, 0, info.text_dim
    return dit_config(
        cfg.model.preset,
        in_channels=in_channels,
        cond_vocab_size=world.vocab_size if cond_vocab_size is None else cond_vocab_size,
        cond_dim=cond_dim,
        width=cfg.model.width,
        depth=cfg.model.depth,
        num_heads=cfg.model.num_heads,
        patch_size=tuple(cfg.model.patch_size) if cfg.model.patch_size else None,
        attention=cfg.model.attention,
    )


def adapter_sampling_kwargs(cfg: RunConfig) -> dict:
    """``model.sampler`` / ``model.sample_shift`` as adapter arguments (the recipe loader checks them against
    ``model.kind``)."""
    m = cfg.model
    if not loads_from_directory(cfg):
        return {}
    kwargs = {"sampler": None if m.sampler == "auto" else m.sampler}
    if m.sample_shift is not None:
        kwargs["sample_shift"] = float(m.sample_shift)
    return kwargs


def build_policy(cfg: RunConfig, world, device: torch.device | str = "cpu"):
    """The video DiT of the recipe, initialised from the ``(seed, "init")`` stream, or (``model.kind`` wan /
    cogvideox) the diffusers transformer of ``model.path`` behind its engine adapter."""
    sampling = adapter_sampling_kwargs(cfg)
    if loads_from_directory(cfg):  # weights come from the model directory, not from the init stream
        dtype = DTYPES[cfg.model.dtype]
        return load_adapter(cfg.model.kind, resolve_path(cfg.model.path), device=device, dtype=dtype,
                            **sampling).to(device=device, dtype=dtype)

    dcfg = dit_config_for(cfg, world)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_dit(dcfg)
    dtype = DTYPES[cfg.model.dtype]
    return model.to(device=device, dtype=dtype)


def autocast_context(cfg: RunConfig, device: torch.device):
    """bf16 autocast on GPU when ``train.autocast`` is auto/bf16; nothing on CPU unless asked for."""
    mode = cfg.train.autocast
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_threads(cfg: RunConfig) -> None:
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)


def run_segment_ids(cfg: RunConfig, domain: Optional[Domain] = None, vae: Optional[VideoVAE] = None, *,
                    pixels: bool = False) -> torch.Tensor:
    """The segment id of each latent frame (``pixels``: of each pixel frame) of the run's videos: DenseDPO's
    segments of ``label.segment_seconds`` mapped through the VAE's temporal compression k (a pixel-space model:
    ``label.temporal_compression``). Without a domain, the shapes world's geometry (its frames are latent
    frames). ``1 + (F - 1) / k`` latent frames cover F pixel frames, so both maps give the same segments."""
    if domain is None:
        return make_segment_ids(cfg.world.frames, cfg.world.fps, cfg.label.segment_seconds,
                                cfg.label.temporal_compression)
    if pixels and not isinstance(domain, ShapesDomain):   # decoded videos: segments of pixel frames
        return make_segment_ids(domain.frames, domain.fps, cfg.label.segment_seconds, 1)
    if vae is None or vae.pixel_space:   # the model's frames are the pixel frames the labellers see
        return make_segment_ids(domain.frames, domain.fps, cfg.label.segment_seconds, cfg.label.temporal_compression)
    k = vae.temporal_compression
    if pixels:
        return make_segment_ids(domain.frames, domain.fps, cfg.label.segment_seconds, 1)
    latent_frames = domain.frames if k == 1 else 1 + (domain.frames - 1) // k
    return make_segment_ids(latent_frames, domain.fps, cfg.label.segment_seconds, k)


def _require_init(cfg: RunConfig) -> Path:
    if not cfg.train.init_from:
        raise ConfigError("train.init_from must name the policy to start from (e.g. recipes/shapes/base)")
    return resolve_path(cfg.train.init_from)


def load_initial_policy(cfg: RunConfig, world, device) -> torch.nn.Module:
    model = build_policy(cfg, world, device)
    if loads_from_directory(cfg) and not cfg.train.init_from:
        return model  # a diffusers model directory (model.path) already holds the weights
    ckpt.load_weights(model, _require_init(cfg))
    return model


def meta_policy(cfg: RunConfig, world) -> torch.nn.Module:
    """The modules ``build_policy`` builds, on the meta device (no storage, no weights read): the DiT's constructor,
    or the family's adapter over diffusers transformers made with ``from_config`` from their config.json, in the
    recipe's dtype. What ranks other than 0 lay out under ``parallel.init: rank0`` (``vidpo.training.sharded_init``)
    before their shards arrive."""
    dtype = DTYPES[cfg.model.dtype]
    if not loads_from_directory(cfg):
        with torch.device("meta"):
            model = build_dit(dit_config_for(cfg, world))
        return model.to(dtype=dtype)
    kind, path = cfg.model.kind, resolve_path(cfg.model.path)
    adapter = model_spec(kind).adapter
    transformer_class = adapter._diffusers_transformer_class()

    def on_meta(config: dict) -> torch.nn.Module:
        with torch.device("meta"):
            return transformer_class.from_config(config)

    sampling = adapter_sampling_kwargs(cfg)
    if is_pipeline_dir(path):
        pipe = open_pipeline(kind, path)

        class MetaPipeline(type(pipe)):
            def transformer(self, part: str = "transformer", **_):
                return on_meta(self.config(part))

        # The adapter's own from_pipeline (scheduler, Wan 2.2's second expert and its boundary), each transformer
        # made from its config instead of loaded. It reads the small text-conditioner table, moved to meta below.
        fields = {f.name: getattr(pipe, f.name) for f in dataclasses.fields(pipe) if f.init}
        model = adapter.from_pipeline(MetaPipeline(**fields), **sampling)
    else:
        config = json.loads((transformer_dir(path) / "config.json").read_text())
        model = adapter(on_meta(config), _meta_conditioner(path), **sampling)
    return model.to(device="meta", dtype=dtype)


def _meta_conditioner(path: Path) -> Optional[TextConditioner]:
    """A model directory's TextConditioner on meta, its shape read from the file's header."""
    file = path / CONDITIONER_FILE
    if not file.exists():
        return None
    with safe_open(str(file), framework="pt") as f:
        shape = f.get_slice("table").get_shape()
    return TextConditioner(torch.empty(shape, device="meta"))
