"""Video autoencoders behind one interface: what the engine needs of a model's VAE.

A text-to-video model samples in a latent space; people and judges look at pixels. Every stage that goes
from one to the other asks the model's VAE, never a family-specific class:

  ``latent_channels``        C of the latents ``(B, C, T', H', W')``
  ``temporal_compression``   k: latent frame 0 encodes pixel frame 0 alone, latent frame j > 0 pixel frames
                             ``k (j - 1) + 1 .. k j`` (a causal video VAE: Wan, CogVideoX), so F pixel frames
                             give ``T' = 1 + (F - 1) / k`` latent frames
  ``spatial_compression``    s: ``H' = H / s``, ``W' = W / s``
  ``latent_shape(F, H, W)``  ``(C, T', H', W')``, or a ValueError naming what does not divide
  ``pixel_frames(T')``       ``1 + k (T' - 1)``
  ``encode(pixels)``         ``(B, 3, F, H, W)`` in [-1, 1] -> normalised latents (the posterior mean), float32
  ``decode(latents)``        normalised latents -> ``(B, 3, F, H, W)`` in [-1, 1], float32

``IdentityVAE`` is the VAE of a pixel-space model (the shapes world's DiT and tiny test models): latents are
the pixels themselves. The diffusers VAEs of the model families live beside it (``DiffusersVAE``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vidpo.models.text_encoder import offline_hub


class VideoVAE:
    """The interface (module docstring); subclasses set the three sizes and implement ``encode`` / ``decode``."""

    latent_channels: int = 3
    temporal_compression: int = 1
    spatial_compression: int = 1

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        k, s = self.temporal_compression, self.spatial_compression
        problems = []
        if frames < 1 or (frames - 1) % k:
            problems.append(f"{frames} frames: this VAE compresses time {k}x and needs 1 + {k}k frames "
                            f"(e.g. {1 + k * max(1, (frames - 1) // k)})")
        for name, size in (("height", height), ("width", width)):
            if size < 1 or size % s:
                problems.append(f"{name} {size} is not a multiple of the spatial compression {s}")
        if problems:
            raise ValueError("; ".join(problems))
        return self.latent_channels, 1 + (frames - 1) // k, height // s, width // s

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_compression * (latent_frames - 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IdentityVAE(VideoVAE):
    """A pixel-space model's "VAE": latents are the RGB pixels, ``(B, 3, F, H, W)`` in [-1, 1]."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1.0, 1.0)


# ----- the diffusers VAEs of the model families --------------------------------------------------------------
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


class DiffusersVAE(VideoVAE):
    """A diffusers video VAE from a local directory; ``encode(x (B, 3, F, H, W) in [-1, 1])`` gives the
    normalised latent mean ``(B, C, T, H', W')`` in float32."""

    def __init__(self, directory: Path, device: torch.device, dtype: torch.dtype):
        offline_hub()
        import diffusers

        name, self.norm, self.temporal = vae_facts(directory)
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "encode"):
            raise ValueError(f"{directory}: config.json names '{name}', not a diffusers VAE "
                             "(expected AutoencoderKLWan or AutoencoderKLCogVideoX)")
        self.vae = cls.from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.device, self.dtype, self.class_name = device, dtype, name
        config = self.vae.config
        self.latent_channels = int(config.get("z_dim") or config.get("latent_channels"))
        self.temporal_compression = self.temporal
        self.spatial_compression = int(config.get("scale_factor_spatial")
                                       or 2 ** (len(config.get("block_out_channels", (0,))) - 1))

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
