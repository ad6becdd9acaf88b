"""Decoding latents with gradient in bounded memory: the VAE's own spatial tiles, each under activation checkpointing.

A differentiable reward (T2V-Turbo-v2's image-text and video-text rewards) scores the student's sample in pixels,
so its gradient goes back through the VAE decoder. Both video VAEs are large at full resolution: decoding the first
2 latent frames of a 480 x 832 clip with Wan 2.1's VAE keeps 33.5 GiB for backward (float32), the first 3 of a
480 x 720 clip with CogVideoX's 124.7 GiB (``vidpo scale`` counts them on the meta device). diffusers' tiled decode
splits the latents into overlapping spatial tiles, decodes each alone and blends the seams; with gradient the
whole of every tile's activations is kept anyway. Here each tile's decode runs under ``torch.utils.checkpoint``
(non-reentrant): the forward keeps only the tiles' latents and decoded pixels, the backward recomputes one tile at
a time, so the peak is one tile's activations (Wan's default 256 x 256 pixel tiles: 5.6 GiB for the clip above).

The result equals diffusers' ``tiled_decode`` (``AutoencoderKLWan`` / ``AutoencoderKLCogVideoX``): the same tiles,
the same per-tile loop over latent frames with its causal cache, the same blend (the VAE's ``blend_v`` / ``blend_h``)
and crop, bit for bit in the forward and equal gradients (tests/test_vae_grad.py). A clip no larger than one tile
decodes whole, as diffusers does (one checkpointed tile would only repeat the forward without lowering the peak).
The tile sizes are the VAE's own (``enable_tiling`` arguments; diffusers' defaults: Wan 256 x 256 pixels at a
192 stride, CogVideoX half the model's sample size with 1/6 and 1/5 overlaps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

WAN, COGVIDEOX = "AutoencoderKLWan", "AutoencoderKLCogVideoX"


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a ``height x width`` latent lie (latent units) and how their pixels are blended."""

    starts_h: tuple
    starts_w: tuple
    tile_h: int                 # latent rows / columns of a whole tile
    tile_w: int
    blend_h: int                # pixel rows / columns blended across a seam
    blend_w: int
    keep_h: int                 # pixel rows / columns each tile contributes (before the final crop)
    keep_w: int

    @property
    def count(self) -> int:
        return len(self.starts_h) * len(self.starts_w)


def _family(vae) -> str:
    name = type(vae).__name__
    if name not in (WAN, COGVIDEOX):
        raise TypeError(f"{name} is not a video VAE this decode knows ({WAN}, {COGVIDEOX})")
    return name


def tile_grid(vae, height: int, width: int) -> TileGrid:
    """The tiles diffusers' ``tiled_decode`` uses for a latent of ``height x width`` (see its code: the strides,
    blend extents and kept sizes are computed as there)."""
    if _family(vae) == WAN:
        ratio = vae.spatial_compression_ratio
        patch = vae.config.patch_size or 1
        stride_h, stride_w = vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio
        keep_h, keep_w = vae.tile_sample_stride_height // patch, vae.tile_sample_stride_width // patch
        return TileGrid(tuple(range(0, height, stride_h)), tuple(range(0, width, stride_w)),
                        vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio,
                        vae.tile_sample_min_height // patch - keep_h, vae.tile_sample_min_width // patch - keep_w,
                        keep_h, keep_w)
    stride_h = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height))
    stride_w = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width))
    blend_h = int(vae.tile_sample_min_height * vae.tile_overlap_factor_height)
    blend_w = int(vae.tile_sample_min_width * vae.tile_overlap_factor_width)
    return TileGrid(tuple(range(0, height, stride_h)), tuple(range(0, width, stride_w)), vae.tile_latent_min_height,
                    vae.tile_latent_min_width, blend_h, blend_w, vae.tile_sample_min_height - blend_h,
                    vae.tile_sample_min_width - blend_w)


def set_tile_size(vae, height: int, width: int) -> None:
    """Tiles of ``height x width`` pixels (``reward.decode_tile``) through the VAE's ``enable_tiling``, with its default
    overlaps: Wan's stride 3/4 of the tile (192 of 256), CogVideoX's overlap factors. ValueError for a size whose
    tiles would not meet exactly (Wan: a multiple of 4 x the spatial compression; CogVideoX: a multiple of 48 high
    and 40 wide with its 1/6 and 1/5 overlaps), naming the sizes that do."""
    if _family(vae) == WAN:
        step = 4 * vae.spatial_compression_ratio
        if height % step or width % step or height <= 0 or width <= 0:
            raise ValueError(f"tiles of {height} x {width} pixels: {WAN}'s tile height and width must be a multiple "
                             f"of {step} pixels (its stride, 3/4 of a tile, must be whole latents)")
        vae.enable_tiling(tile_sample_min_height=height, tile_sample_min_width=width,
                          tile_sample_stride_height=height * 3 // 4, tile_sample_stride_width=width * 3 // 4)
        return
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    for size, factor, what in ((height, vae.tile_overlap_factor_height, "height"),
                               (width, vae.tile_overlap_factor_width, "width")):
        if size <= 0 or int(size // scale * (1 - factor)) * scale != size - int(size * factor):
            step = round(scale / factor)
            raise ValueError(f"tiles of {height} x {width} pixels: {COGVIDEOX}'s tile {what} must be a multiple of "
                             f"{step} pixels (with its {factor:.3g} overlap the tiles meet exactly only then), "
                             f"got {size}")
    vae.enable_tiling(tile_sample_min_height=height, tile_sample_min_width=width)


def fits_one_tile(vae, height: int, width: int) -> bool:
    """Whether diffusers decodes a latent of ``height x width`` whole (its ``_decode`` tiles only larger ones)."""
    if _family(vae) == WAN:
        ratio = vae.spatial_compression_ratio
        return height <= vae.tile_sample_min_height // ratio and width <= vae.tile_sample_min_width // ratio
    return height <= vae.tile_latent_min_height and width <= vae.tile_latent_min_width


def decode_tile(vae, z: torch.Tensor) -> torch.Tensor:
    """One tile's pixels (before blending; Wan: still patchified, unclamped): the per-tile body of ``tiled_decode``,
    a function of ``z`` alone (the causal cache starts empty and is cleared after), so it can be recomputed."""
    frames = z.shape[2]
    pieces = []
    if _family(vae) == WAN:
        vae.clear_cache()
        for k in range(frames):
            vae._conv_idx = [0]
            x = vae.post_quant_conv(z[:, :, k:k + 1])
            pieces.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(k == 0)))
        vae.clear_cache()
        return torch.cat(pieces, dim=2)
    batch = vae.num_latent_frames_batch_size
    remaining, cache = frames % batch, None
    for k in range(max(frames // batch, 1)):
        start = batch * k + (0 if k == 0 else remaining)
        x = z[:, :, start:batch * (k + 1) + remaining]
        if vae.post_quant_conv is not None:
            x = vae.post_quant_conv(x)
        x, cache = vae.decoder(x, conv_cache=cache)
        pieces.append(x)
    return torch.cat(pieces, dim=2)


def _finish(vae, pixels: torch.Tensor) -> torch.Tensor:
    """What ``tiled_decode`` does after blending: Wan unpatchifies (TI2V-5B's 2 x 2) and clamps; CogVideoX nothing."""
    if _family(vae) == WAN:
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            pixels = unpatchify(pixels, patch_size=vae.config.patch_size)
        return torch.clamp(pixels, min=-1.0, max=1.0)
    return pixels


def checkpointed_tiled_decode(vae, z: torch.Tensor, *, use_checkpoint: bool = True,
                              tile_decoder: Callable = decode_tile) -> torch.Tensor:
    """diffusers' decode of raw latents ``z (B, C, T, h, w)`` -> pixels (module docstring): tiled as its
    ``tiled_decode`` when the latent is larger than one tile, each tile recomputed in the backward
    (``use_checkpoint``); whole, as its ``decode``, otherwise. ``tile_decoder(vae, z_tile)``: ``decode_tile``
    (``vidpo scale`` passes a stand-in of the same shapes to count what the blend keeps without decoding)."""
    height, width = z.shape[-2:]
    if fits_one_tile(vae, height, width):
        return vae.decode(z).sample           # diffusers' whole decode (it tiles only larger latents)
    grid = tile_grid(vae, height, width)

    def run(tile: torch.Tensor) -> torch.Tensor:
        if use_checkpoint and torch.is_grad_enabled() and tile.requires_grad:
            return checkpoint(tile_decoder, vae, tile, use_reentrant=False)
        return tile_decoder(vae, tile)

    rows = [[run(z[:, :, :, i:i + grid.tile_h, j:j + grid.tile_w]) for j in grid.starts_w] for i in grid.starts_h]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, grid.blend_h)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, grid.blend_w)
            kept.append(tile[:, :, :, :grid.keep_h, :grid.keep_w])
        out_rows.append(torch.cat(kept, dim=-1))
    pixels = torch.cat(out_rows, dim=3)
    if _family(vae) == WAN:      # Wan crops the blended tiles to the clip's size; CogVideoX keeps them whole
        ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
        pixels = pixels[:, :, :, :height * ratio // patch, :width * ratio // patch]
    return _finish(vae, pixels)
