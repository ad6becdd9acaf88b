"""Decoding with gradient in tiles (vidpo.models.vae_grad) and what ``vidpo scale`` counts for it
(vidpo.cluster.reward_memory), on tiny random Wan 2.1, Wan 2.2 TI2V-5B and CogVideoX VAEs:

* the checkpointed tiled decode equals diffusers' ``tiled_decode`` bit for bit, and its gradient equals autograd
  through diffusers' (so the recomputed tiles are the tiles); the forward keeps almost nothing of the tiles;
* the count on the meta device equals the bytes the real decode saves, whole and tiled;
* ``vidpo scale`` adds the VAE and the reward model as they are loaded, and the decode, to a distillation step.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from helpers.pipelines import tiny_cogvideox_vae, tiny_wan_vae  # noqa: E402

from vidpo.cluster.reward_memory import _vae_counts, saved_bytes  # noqa: E402
from vidpo.models.vae_grad import checkpointed_tiled_decode, decode_tile, fits_one_tile, tile_grid  # noqa: E402

WAN_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                 tile_sample_stride_width=24)
COG_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=1 / 4,
                 tile_overlap_factor_width=1 / 4)
# (name, VAE, latent shape (B, C, T, h, w) larger than one tile, tile settings)
CASES = {
    "wan2.1": (lambda: tiny_wan_vae(), (1, 16, 2, 8, 10), WAN_TILES),
    "wan2.2-ti2v": (lambda: tiny_wan_vae(ti2v=True), (1, 48, 2, 4, 5), WAN_TILES),
    "cogvideox": (lambda: tiny_cogvideox_vae(), (2, 16, 3, 8, 10), COG_TILES),
}


def _vae(case: str):
    make, shape, tiles = CASES[case]
    vae = make()
    vae.requires_grad_(False)
    vae.enable_tiling(**tiles)
    return vae, shape


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointed_tiles_equal_diffusers_tiled_decode_and_its_gradient(case):
    vae, shape = _vae(case)
    assert not fits_one_tile(vae, *shape[-2:]) and tile_grid(vae, *shape[-2:]).count >= 4
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    theirs_in = z.clone().requires_grad_(True)
    theirs = vae.tiled_decode(theirs_in).sample
    weight = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1))
    (theirs * weight).sum().backward()
    ours_in = z.clone().requires_grad_(True)
    ours = checkpointed_tiled_decode(vae, ours_in)
    (ours * weight).sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_in.grad, theirs_in.grad) and float(theirs_in.grad.abs().max()) > 0
    # without checkpoints the same values and gradient, and every tile's activations kept for backward
    plain_in = z.clone().requires_grad_(True)
    assert torch.equal(checkpointed_tiled_decode(vae, plain_in, use_checkpoint=False), theirs)
    kept_tiled = saved_bytes(lambda: checkpointed_tiled_decode(vae, z.clone().requires_grad_(True)))
    kept_plain = saved_bytes(lambda: checkpointed_tiled_decode(vae, z.clone().requires_grad_(True),
                                                               use_checkpoint=False))
    grid = tile_grid(vae, *shape[-2:])
    one_tile = saved_bytes(lambda: decode_tile(vae, z[:, :, :, :grid.tile_h, :grid.tile_w].requires_grad_(True)))
    assert kept_tiled < one_tile < kept_plain / 3


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_latent_within_one_tile_decodes_whole_as_diffusers_does(case):
    vae, shape = _vae(case)
    small = shape[:3] + (2, 2)
    assert fits_one_tile(vae, *small[-2:])
    z = torch.randn(small, generator=torch.Generator().manual_seed(2))
    assert torch.equal(checkpointed_tiled_decode(vae, z), vae.decode(z).sample)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tiles", [True, False])
def test_the_meta_count_is_what_the_real_decode_saves(case, tiles):
    """``vidpo scale``'s count (the VAE built on the meta device from its config) equals the bytes the real
    decode's graph keeps: whole; tiled, the part outside the tiles plus one whole tile's."""
    vae, shape = _vae(case)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    # the tile sizes are set on the model, not in its config: give the meta model the defaults' equivalent by
    # decoding a latent that the real default tiles split too
    vae_default = type(vae)(**config).eval()
    vae_default.requires_grad_(False)
    vae_default.load_state_dict(vae.state_dict())
    if case.startswith("wan"):
        ratio = vae_default.spatial_compression_ratio
        latent = shape[:3] + (256 // ratio + 2, 256 // ratio + 3)
    else:
        latent = shape[:3] + (vae_default.tile_latent_min_height + 2, vae_default.tile_latent_min_width + 3)
    params, counted, frames, count = _vae_counts(type(vae).__name__, json.dumps(config, sort_keys=True, default=list),
                                                 latent, tiles)
    assert params == sum(p.numel() for p in vae_default.parameters())
    z = torch.zeros(latent, requires_grad=True)
    weights = list(vae_default.parameters())      # the model's own memory, counted as its weights
    if tiles:
        grid = tile_grid(vae_default, *latent[-2:])
        assert count == grid.count > 1
        real = saved_bytes(lambda: checkpointed_tiled_decode(vae_default, z), weights) + saved_bytes(
            lambda: decode_tile(vae_default, z[:, :, :, :grid.tile_h, :grid.tile_w]), weights)
    else:
        assert count == 1
        real = saved_bytes(lambda: vae_default.decode(z).sample, weights)
    assert saved_bytes(lambda: vae_default.decode(z).sample) > saved_bytes(lambda: vae_default.decode(z).sample,
                                                                            weights)
    assert counted == real > 0
    assert frames == checkpointed_tiled_decode(vae_default, z.detach()).shape[2]


def test_the_distillations_reward_decode_is_the_checkpointed_tiled_decode_of_its_prefix(tmp_path):
    """``differentiable_decode`` (what ``vidpo distill`` scores): the first K latent frames, denormalised, through the
    tiles (``reward.decode_checkpoint``) or whole; both carry the gradient to the latents."""
    from vidpo.models.vae import DiffusersVAE
    from vidpo.stages.distill_real import differentiable_decode

    tiny_wan_vae().save_pretrained(str(tmp_path / "vae"))
    vae = DiffusersVAE(tmp_path / "vae")
    vae.vae.enable_tiling(**WAN_TILES)
    latents = torch.randn(1, 16, 3, 8, 10, generator=torch.Generator().manual_seed(3), requires_grad=True)
    tiled = differentiable_decode(vae, 2)(latents)
    raw = vae.denormalize(latents.detach()[:, :, :2])
    assert torch.equal(tiled, vae.vae.tiled_decode(raw).sample.clamp(-1, 1)) and tiled.shape[2] == 5
    (grad,) = torch.autograd.grad(tiled.square().sum(), latents)
    assert float(grad[:, :, :2].abs().max()) > 0 and float(grad[:, :, 2:].abs().max()) == 0
    vae.vae.disable_tiling()
    whole = differentiable_decode(vae, 2, checkpoint_tiles=False)(latents)
    assert torch.equal(whole, vae.decode(latents.detach()[:, :, :2]))


@pytest.mark.parametrize("case,size,meets", [("wan2.1", (64, 96), True), ("wan2.1", (60, 64), False),
                                             ("wan2.2-ti2v", (64, 128), True), ("wan2.2-ti2v", (32, 64), False),
                                             ("cogvideox", (48, 40), True), ("cogvideox", (64, 80), False)])
def test_a_chosen_tile_size_tiles_the_clip_exactly_or_is_refused(case, size, meets):
    """``reward.decode_tile``: sizes whose tiles meet exactly decode as diffusers' tiled decode does with them, to
    the clip's full size; others are refused with the multiple that works."""
    from vidpo.models.vae_grad import set_tile_size

    make, shape, _ = CASES[case]
    vae = make()
    vae.requires_grad_(False)
    if not meets:
        with pytest.raises(ValueError, match="multiple of"):
            set_tile_size(vae, *size)
        return
    set_tile_size(vae, *size)
    latent = shape[:3] + (20, 22) if not case.endswith("ti2v") else shape[:3] + (10, 11)
    z = torch.randn(latent, generator=torch.Generator().manual_seed(4))
    ours = checkpointed_tiled_decode(vae, z)
    assert tile_grid(vae, *latent[-2:]).count > 4 and torch.equal(ours, vae.tiled_decode(z).sample)
    assert ours.shape[-2:] == (160, 176)


def test_scale_counts_the_tiles_the_recipe_asks_for():
    from vidpo.cluster.scale import estimate
    from vidpo.config import ConfigError, load_config

    recipe = "recipes/wan/wan2.1_1.3b_turbo_lora.yaml"
    default = estimate(load_config(recipe, []), 1)
    small = estimate(load_config(recipe, ["reward.decode_tile=[128, 128]"]), 1)
    whole = estimate(load_config(recipe, ["reward.decode_checkpoint=false"]), 1)
    act = [e.memory_gib["reward_activations"] for e in (small, default, whole)]
    assert act[0] < act[1] < act[2] / 4
    assert any("in 15 tiles" in note for note in default.assumptions)
    assert any("whole" in note for note in whole.assumptions)
    with pytest.raises(ConfigError, match=r"reward.decode_tile = \[100, 128\].*multiple of 32"):
        estimate(load_config(recipe, ["reward.decode_tile=[100, 128]"]), 1)


def test_the_reward_models_count_is_what_their_image_towers_save(tmp_path):
    """A local CLIP reward model counted on the meta device: its parameters, and the bytes the real image tower
    saves for the input's gradient (its weights aside); the published ViT-H/14 and ViT-L/14 by the paths that name
    them, at their published sizes."""
    from transformers import CLIPConfig, CLIPModel

    from vidpo.cluster.reward_memory import _clip_counts, reward_model_source

    config = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.requires_grad_(False)
    model.save_pretrained(str(tmp_path / "clip"))
    source, where = reward_model_source(str(tmp_path / "clip"))
    assert source == str(tmp_path / "clip") and where.endswith("config.json")
    pixels = torch.zeros(3, 3, 32, 32, requires_grad=True)
    real = saved_bytes(lambda: model.get_image_features(pixel_values=pixels), model.parameters())
    assert _clip_counts(source, 3) == (sum(p.numel() for p in model.parameters()), real) and real > 0
    assert reward_model_source("/models/HPSv2.1-clip-vit-h-14")[0] == "clip-vit-h-14"
    assert reward_model_source("/models/clip-vit-large-patch14")[0] == "clip-vit-l-14"
    assert reward_model_source("/models/some-other-scorer")[0] is None
    assert _clip_counts("clip-vit-h-14", 1)[0] == 986_109_441 and _clip_counts("clip-vit-l-14", 1)[0] == 427_616_513
