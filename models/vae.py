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

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vidpo.models.text_encoder import offline_hub


class VideoVAE:
    """The interface (module docstring); subclasses set the three sizes and implement ``encode`` / ``decode``."""

    latent_channels: int = 3
    temporal_compression: int = 1
    spatial_compression: int = 1
    pixel_space: bool = False
    """True when the latents are the pixels (samples are then clamped to the pixel range [-1, 1])."""

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

    pixel_space = True

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1.0, 1.0)


# ----- the diffusers VAEs of the model families --------------------------------------------------------------
DIFFUSERS_VAES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")


@dataclass(frozen=True)
class VAEGeometry:
    """What a diffusers video VAE's config says about its latents (``vae_geometry``)."""

    class_name: str
    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    norm: dict      # {"kind": "mean_std", "mean", "std"} | {"kind": "scale", "scale"} | {"kind": "none"}


def resolved_vae_config(directory: Path) -> tuple[str, dict]:
    """``(class name, config)``: config.json over the diffusers class's constructor defaults, i.e. the config the
    loaded model has (a release's config.json may omit keys added to diffusers later, e.g. Wan 2.1's VAE has no
    ``scale_factor_*``)."""
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json (not a diffusers VAE folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    name = config.get("_class_name", "")
    if name not in DIFFUSERS_VAES:
        raise ValueError(f"{directory}: config.json names '{name}', not a video VAE vidpo knows "
                         f"(expected one of {DIFFUSERS_VAES})")
    offline_hub()
    import diffusers

    cls = getattr(diffusers, name)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return name, {**defaults, **config}


def vae_geometry(directory: str | os.PathLike) -> VAEGeometry:
    """The latent geometry of the diffusers VAE in ``directory``, from its architecture (not from the optional
    ``scale_factor_*`` hints, which must agree when present):

      AutoencoderKLWan        C = z_dim; temporal 2^(number of temporal downsamples); spatial
                              2^(len(dim_mult) - 1) x patch_size (Wan 2.1: 16, 4x, 8x; Wan 2.2 TI2V-5B: 48, 4x,
                              16x with its 2x2 patchify); latents normalised per channel, (z - mean) / std
      AutoencoderKLCogVideoX  C = latent_channels; temporal ``temporal_compression_ratio``; spatial
                              2^(len(block_out_channels) - 1) (16, 4x, 8x); latents scaled, z * scaling_factor
    """
    directory = Path(directory)
    name, c = resolved_vae_config(directory)
    if name == "AutoencoderKLWan":
        channels = int(c["z_dim"])
        temporal = 2 ** sum(bool(d) for d in c["temperal_downsample"])
        spatial = 2 ** (len(c["dim_mult"]) - 1) * int(c.get("patch_size") or 1)
        declared = {"scale_factor_temporal": temporal, "scale_factor_spatial": spatial}
        norm = {"kind": "mean_std", "mean": [float(v) for v in c["latents_mean"]],
                "std": [float(v) for v in c["latents_std"]]}
        if len(norm["mean"]) != channels or len(norm["std"]) != channels:
            raise ValueError(f"{directory}: latents_mean / latents_std have {len(norm['mean'])} / "
                             f"{len(norm['std'])} entries for z_dim {channels}")
    else:
        channels = int(c["latent_channels"])
        temporal = int(c["temporal_compression_ratio"])
        spatial = 2 ** (len(c["block_out_channels"]) - 1)
        declared = {}
        norm = {"kind": "scale", "scale": float(c["scaling_factor"])} if c.get("scaling_factor") else {"kind": "none"}
    for key, derived in declared.items():
        if c.get(key) is not None and int(c[key]) != derived:
            raise ValueError(f"{directory}: config.json says {key}={c[key]}, but the architecture compresses "
                             f"{derived}x")
    return VAEGeometry(name, channels, temporal, spatial, norm)


def vae_facts(directory: Path) -> tuple[str, dict, int]:
    """``(class name, latent normalisation, temporal compression)`` of a VAE folder (``vae_geometry``)."""
    g = vae_geometry(directory)
    return g.class_name, g.norm, g.temporal_compression


class DiffusersVAE(VideoVAE):
    """A diffusers video VAE (``AutoencoderKLWan`` / ``AutoencoderKLCogVideoX``) from a local directory.

    Both take and return videos as ``(B, C, F, H, W)`` (CogVideoX's transformer wants (B, F, C, H, W); its VAE
    does not). ``encode(x in [-1, 1])`` gives the normalised posterior mean in float32; ``decode`` undoes the
    normalisation (Wan: ``z std + mean`` per channel, CogVideoX: ``z / scaling_factor``, as WanPipeline /
    CogVideoXPipeline do before ``vae.decode``) and returns pixels clamped to [-1, 1], float32.

    ``tiling`` / ``slicing``: diffusers' spatial tiling (large frames) and per-video slicing (large batches) to
    bound decoder memory; both change nothing but memory (tiling blends tile seams, so it is close, not equal)."""

    def __init__(self, directory: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, *, tiling: bool = False, slicing: bool = False):
        directory = Path(directory)
        geometry = vae_geometry(directory)
        import diffusers

        cls = getattr(diffusers, geometry.class_name)
        device = torch.device(device)
        self.vae = cls.from_pretrained(str(directory), torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.vae.requires_grad_(False)
        self.directory, self.device, self.dtype, self.class_name = directory, device, dtype, geometry.class_name
        self.geometry, self.norm = geometry, geometry.norm
        self.latent_channels = geometry.latent_channels
        self.temporal_compression = self.temporal = geometry.temporal_compression
        self.spatial_compression = geometry.spatial_compression
        if tiling:
            self.vae.enable_tiling()
        if slicing:
            self.vae.enable_slicing()

    def _norm_tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.norm["mean"], device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.norm["std"], device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the model's latent space (what the transformer sees), float32."""
        z = z.float()
        if self.norm["kind"] == "mean_std":
            mean, std = self._norm_tensors(z)
            return (z - mean) / std
        if self.norm["kind"] == "scale":
            return z * self.norm["scale"]
        return z

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The model's latents -> raw VAE latents (what ``vae.decode`` takes), float32."""
        z = z.float()
        if self.norm["kind"] == "mean_std":
            mean, std = self._norm_tensors(z)
            return z * std + mean
        if self.norm["kind"] == "scale":
            return z / self.norm["scale"]
        return z

    def _check(self, x: torch.Tensor, what: str, channels: int) -> None:
        if x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"{self.class_name}.{what} takes (B, {channels}, frames, height, width), "
                             f"got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, "encode", 3)
        self.latent_shape(*x.shape[2:])        # a clear error for sizes the VAE cannot compress
        return self.normalize(self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, "decode", self.latent_channels)
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        return self.vae.decode(z).sample.float().clamp(-1.0, 1.0)
