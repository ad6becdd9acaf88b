"""What a release student's differentiable rewards add to one GPU's memory, for ``vidpo scale``.

T2V-Turbo-v2's rewards score the student's one-step sample in pixels, so each step also holds, per GPU:

* ``reward_models``: the release's VAE and each reward model (``reward.models``, loaded once per checkpoint),
  float32 and frozen, as ``vidpo.stages.distill_real`` loads them;
* ``reward_activations``: what their forwards keep for the backward that reaches the student: the VAE decode of the
  reward rows' first ``reward.decode_latent_frames`` latent frames (or whole clips), and the reward models' image
  towers over the frames they score (``reward.image_frames`` per clip for an image-text reward, every decoded frame
  for a video-text one). With ``reward.decode_checkpoint`` the decode runs in the VAE's tiles, each recomputed in
  the backward (``vidpo.models.vae_grad``): the count is what stays outside the tiles plus one whole tile's
  activations, alive while the backward recomputes it.

How it is counted: not by formula. The diffusers VAE (and the transformers CLIP model) is built from its config on
the meta device and run on meta tensors of the step's shapes under ``torch.autograd.graph.saved_tensors_hooks``;
every tensor its autograd graph saves is summed once (views count as their base). Nothing is allocated or computed,
so a 480p decode is counted in about a second. The VAE's config is ``model.path``'s ``vae/config.json`` when that
exists here, else the release's (Wan 2.1 / 2.2 A14B: ``AutoencoderKLWan``'s defaults, which are Wan 2.1's VAE;
CogVideoX: ``AutoencoderKLCogVideoX``'s, which are its VAE); a reward model's is its local ``config.json``, else the
published CLIP its path names (``REWARD_RELEASES``), else it is not counted (the report says so). The models' own
weights, which frozen layers save for their input's gradient, are counted once, as ``reward_models``.
tests/test_vae_grad.py checks the count against real saved tensors.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.config.distill import SERVED_RULE
from vidpo.models.vae import resolved_vae_config
from vidpo.models.vae_grad import checkpointed_tiled_decode, decode_tile, fits_one_tile, set_tile_size, tile_grid

# The VAE a release ships when its directory is not here (diffusers' class defaults are these VAEs' configs).
RELEASE_VAES = {"wan2.1-t2v-1.3b": "AutoencoderKLWan", "wan2.1-t2v-14b": "AutoencoderKLWan",
                "wan2.2-t2v-a14b": "AutoencoderKLWan", "cogvideox-2b": "AutoencoderKLCogVideoX",
                "cogvideox-5b": "AutoencoderKLCogVideoX"}
VAE_BYTES = 4          # float32, as the distillation loads the VAE and the reward models


@dataclass
class RewardMemory:
    """Bytes per GPU (module docstring) and what the count assumed."""

    weights: float = 0.0
    activations: float = 0.0
    decode: float = 0.0                 # of which the VAE decode
    videos: int = 0
    pixel_frames: int = 0
    tiles: int = 1
    notes: list = field(default_factory=list)


@contextlib.contextmanager
def fused_attention_on_meta():
    """SDPA on meta tensors as the fused kernel a device runs: with no kernel for meta, torch picks the math path,
    which keeps the n x n attention matrix; a GPU's memory-efficient kernel (and the CPU's flash kernel) keeps q, k,
    v, the output and the log-sum-exp. Unmasked, dropout-free calls on meta tensors go to the CPU flash kernel's meta
    function (the GPU kernel keeps two 8-byte RNG seeds more); any other call is left as it is."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.is_meta and attn_mask is None and dropout_p == 0.0 and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, is_causal=is_causal,
                                                                               scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_bytes(run: Callable[[], object], weights: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors ``run()``'s autograd graph saves for backward, each storage once (meta tensors too:
    attention counted as the fused kernel, ``fused_attention_on_meta``), less ``weights`` (a frozen layer's weight is
    saved for its input's gradient, but it is the model's own memory, counted as such)."""
    seen, own = {}, {id(w) for w in weights}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in own:
            seen[id(base)] = (base, base.numel() * base.element_size())   # the reference keeps ids unique
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), fused_attention_on_meta():
        run()
    return sum(size for _, size in seen.values())


def _vae_source(cfg: RunConfig, release: Optional[str]) -> tuple[Optional[str], Optional[dict], str]:
    """``(class name, config or None for the class defaults, where from)``; a None class when unknown."""
    folder = resolve_path(cfg.model.path) / "vae" if cfg.model.path else None
    if folder is not None and (folder / "config.json").is_file():
        name, config = resolved_vae_config(folder)
        return name, config, str(folder / "config.json")
    if release in RELEASE_VAES:
        return RELEASE_VAES[release], None, f"the {release} release's VAE"
    return None, None, ""


@functools.lru_cache(maxsize=16)
def _vae_counts(name: str, config_json: str, latent: tuple, checkpoint_tiles: bool,
                tile: Optional[tuple] = None) -> tuple[int, int, int, int]:
    """``(parameters, saved bytes of the decode, pixel frames, tiles)`` of ``latent (B, C, T, h, w)`` on meta;
    ``tile``: ``reward.decode_tile`` (ValueError when the VAE's tiles cannot take it)."""
    import diffusers

    cls = getattr(diffusers, name)
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = cls(**config) if config else cls()
    vae.requires_grad_(False)
    if checkpoint_tiles and tile:
        set_tile_size(vae, *tile)
    params = sum(p.numel() for p in vae.parameters())
    z = torch.zeros(latent, device="meta", requires_grad=True)
    height, width = latent[-2:]
    if checkpoint_tiles and not fits_one_tile(vae, height, width):
        grid = tile_grid(vae, height, width)
        tile = {}
        one_tile = saved_bytes(lambda: tile.setdefault("out", decode_tile(vae, z[:, :, :, :grid.tile_h, :grid.tile_w])),
                               vae.parameters())
        up = tile["out"].shape[-1] // grid.tile_w

        def same_shapes(_, part):      # a tile's output of the right size (edge tiles are cut short), undecoded
            return tile["out"][..., :part.shape[-2] * up, :part.shape[-1] * up] * 1.0
        pixels = {}
        outside = saved_bytes(lambda: pixels.setdefault("out", checkpointed_tiled_decode(vae, z,
                                                                                         tile_decoder=same_shapes)),
                              vae.parameters())
        return params, outside + one_tile, pixels["out"].shape[2], grid.count
    holder = {}
    whole = saved_bytes(lambda: holder.setdefault("out", vae.decode(z).sample), vae.parameters())
    return params, whole, holder["out"].shape[2], 1


# Published CLIP-style reward models, recognised in a reward.models path that is not on this machine (lower case):
# OpenCLIP ViT-H/14 (HPSv2 / HPSv2.1 fine-tune it; exported as a transformers CLIPModel) and OpenAI CLIP ViT-L/14
# (openai/clip-vit-large-patch14). Built on the meta device they have 986,109,441 and 427,616,513 parameters, the
# published sizes (986 M, 428 M).
_TEXT = dict(vocab_size=49408, max_position_embeddings=77)
REWARD_RELEASES = {
    "clip-vit-h-14": (r"vit-h-14|vit-huge-patch14|hpsv2", dict(
        text_config=dict(_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"), projection_dim=1024)),
    "clip-vit-l-14": (r"vit-large-patch14|vit-l-14", dict(
        text_config=dict(_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"), projection_dim=768)),
}


def reward_model_source(path: str) -> tuple[Optional[str], str]:
    """``(what _clip_counts builds, where from)``: the local directory when it has a config.json, else the published
    model its path names (``REWARD_RELEASES``); ``(None, why)`` otherwise."""
    local = resolve_path(path)
    if (Path(local) / "config.json").is_file():
        return str(local), str(Path(local) / "config.json")
    for name, (pattern, _) in REWARD_RELEASES.items():
        if re.search(pattern, str(path).lower()):
            return name, f"the published {name} (named by {path}, which is not on this machine)"
    return None, f"{path} is not on this machine and names no published reward model ({sorted(REWARD_RELEASES)})"


@functools.lru_cache(maxsize=16)
def _clip_counts(source: str, images: int) -> tuple[int, int]:
    """``(parameters, saved bytes of the image tower over ``images`` frames)`` of a transformers CLIP model: a local
    directory, or a ``REWARD_RELEASES`` name."""
    from transformers import CLIPConfig, CLIPModel

    if source in REWARD_RELEASES:
        config = CLIPConfig(**REWARD_RELEASES[source][1])
    else:
        config = CLIPConfig.from_pretrained(source, local_files_only=True)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.requires_grad_(False)
    size = int(config.vision_config.image_size)
    pixels = torch.zeros(images, 3, size, size, device="meta", requires_grad=True)
    saved = saved_bytes(lambda: model.get_image_features(pixel_values=pixels), model.parameters())
    return sum(p.numel() for p in model.parameters()), saved


def reward_memory(cfg: RunConfig, latent_grid: tuple[int, int, int], release: Optional[str], rows: float) -> \
        Optional[RewardMemory]:
    """The rewards' share of one GPU's memory for a step whose micro-batch has ``rows`` rows on this GPU and whose
    clips have latents ``latent_grid (T, h, w)``; None when the recipe has no differentiable reward."""
    r = cfg.reward
    models = r.models or {}
    names = [(kind, name) for kind, table in (("image", r.image), ("video", r.video)) for name in (table or {})
             if not (isinstance(models.get(name), dict) and models[name].get("rule") == SERVED_RULE)]
    if not names:
        return None
    out = RewardMemory(videos=int(min(r.max_rows, max(rows, 1))))
    frames_t, height, width = latent_grid
    latent_frames = min(r.decode_latent_frames or frames_t, frames_t)
    name, config, source = _vae_source(cfg, release)
    if name is None:
        out.notes.append(f"rewards: the VAE of {cfg.model.path} is not known here (no vae/config.json): its weights "
                         "and decode are not counted")
        out.pixel_frames = 1 + 4 * (latent_frames - 1)
    else:
        channels = int((config or {}).get("z_dim" if name == "AutoencoderKLWan" else "latent_channels", 16))
        latent = (out.videos, channels, latent_frames, height, width)
        tile = tuple(r.decode_tile) if r.decode_tile else None
        try:
            params, decode, out.pixel_frames, out.tiles = _vae_counts(
                name, json.dumps(config or {}, sort_keys=True), latent, r.decode_checkpoint, tile)
        except ValueError as exc:
            raise ConfigError(f"reward.decode_tile = {list(tile)}: {exc}") from None
        out.weights += params * VAE_BYTES
        out.decode = out.activations = float(decode)
        how = f"in {out.tiles} tiles, one recomputed at a time" if out.tiles > 1 else "whole"
        out.notes.append(f"rewards: {source} decodes {out.videos} clip(s) of {latent_frames} latent frames "
                         f"({out.pixel_frames} pixel frames) with gradient, {how}: {decode / 2 ** 30:.2f} GiB saved "
                         "(counted on the meta device)")
    counted = set()
    for kind, reward in names:
        spec = models.get(reward)
        if not (isinstance(spec, dict) and spec.get("path")):
            out.notes.append(f"rewards: '{reward}' is not one of reward.models: not counted")
            continue
        source, where = reward_model_source(spec["path"])
        if source is None:
            out.notes.append(f"rewards: reward model '{reward}': {where}: its weights and activations are not counted")
            continue
        images = out.videos * (min(r.image_frames, out.pixel_frames) if kind == "image" else out.pixel_frames)
        params, saved = _clip_counts(source, images)
        if Path(spec["path"]) not in counted:      # names on one checkpoint share its weights (build_model_rewards)
            counted.add(Path(spec["path"]))
            out.weights += params * VAE_BYTES
        out.activations += saved
        out.notes.append(f"rewards: reward model '{reward}' from {where}: {params / 1e6:.0f} M parameters, "
                         f"{saved / 2 ** 30:.2f} GiB saved over {images} frames")
    return out
