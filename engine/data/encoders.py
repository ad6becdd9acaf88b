"""The encoders of ``vidpo cache``, loaded from local directories only: a diffusers VAE (clips -> latents,
the posterior mean, scaled as the model expects) and a transformers text encoder + tokenizer (captions ->
embeddings and masks). Nothing is downloaded: hub access is switched off before loading.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.config import ConfigError, resolve_path


def offline_hub() -> None:
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
        raise ImportError(f"vidpo cache needs diffusers and transformers (pip install 'vidpo[hf]'): {exc}") from None
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def local_dir(value: Optional[str], key: str) -> Path:
    if not value:
        raise ConfigError(f"'{key}' is not set: give a local directory (e.g. --set {key}=/models/...)")
    path = resolve_path(value)
    if not (path / "config.json").is_file():
        raise ConfigError(f"'{key}' = {value}: no config.json in {path} (expected a save_pretrained directory)")
    return path


def file_digest(path: Path) -> str:
    """sha1 of a file; of a folder manifest, its videos' names and sizes and its caption files."""
    h = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(f"{file.relative_to(path)}:{file.stat().st_size}\n".encode())
            if file.suffix.lower() != ".txt":
                continue  # videos by name and size: hashing every video of a dataset would take minutes
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----- the encoders ----------------------------------------------------------------------------------------
def vae_facts(directory: Path) -> tuple[str, dict, int]:
    """``(class name, latent normalisation, temporal compression)`` from a VAE's config.json."""
    config = json.loads((directory / "config.json").read_text())
    temporal = int(config.get("scale_factor_temporal") or config.get("temporal_compression_ratio") or 1)
    if "latents_mean" in config and "latents_std" in config:
        norm = {"kind": "mean_std", "mean": list(config["latents_mean"]), "std": list(config["latents_std"])}
    elif config.get("scaling_factor"):
        norm = {"kind": "scale", "scale": float(config["scaling_factor"])}
    else:
        norm = {"kind": "none"}
    return config.get("_class_name", ""), norm, temporal


class VAEEncoder:
    """A diffusers video VAE from a local directory; ``encode(x (B, 3, F, H, W) in [-1, 1])`` gives the
    normalised latent mean ``(B, C, T, H', W')`` in float32."""

    def __init__(self, directory: Path, device: torch.device, dtype: torch.dtype):
        offline_hub()
        import diffusers

        name, self.norm, self.temporal = vae_facts(directory)
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "encode"):
            raise ConfigError(f"cache.vae = {directory}: config.json names '{name}', not a diffusers VAE "
                              "(expected AutoencoderKLWan or AutoencoderKLCogVideoX)")
        self.vae = cls.from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.device, self.dtype, self.class_name = device, dtype, name

    def check_frames(self, frames: int) -> None:
        if self.temporal > 1 and (frames - 1) % self.temporal:
            raise ConfigError(f"cache.frames = {frames}: {self.class_name} compresses time {self.temporal}x and "
                              f"needs 1 + {self.temporal}k frames (e.g. {1 + self.temporal * max(1, (frames - 1) // self.temporal)})")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mean.float()
        if self.norm["kind"] == "mean_std":
            shape = (1, -1, 1, 1, 1)
            mean = torch.tensor(self.norm["mean"], device=z.device).view(shape)
            std = torch.tensor(self.norm["std"], device=z.device).view(shape)
            z = (z - mean) / std
        elif self.norm["kind"] == "scale":
            z = z * self.norm["scale"]
        return z


class TextEncoder:
    """A transformers encoder (T5 / UMT5 encoder, or any model with ``last_hidden_state``) and its tokenizer
    from local directories; ``encode(captions)`` -> ``(emb float32 (B, L, D), mask bool (B, L))``."""

    def __init__(self, directory: Path, tokenizer_dir: Path, device: torch.device, dtype: torch.dtype,
                 max_length: int):
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
        self.device, self.max_length, self.class_name = device, max_length, cls.__name__

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device).bool()
        hidden = self.model(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask.long()).last_hidden_state
        return (hidden.float() * mask[..., None]).cpu(), mask.cpu()
