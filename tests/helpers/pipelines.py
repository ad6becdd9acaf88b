"""Tiny random diffusers pipeline directories laid out AS RELEASED (``model_index.json`` + ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), written by the pipelines' own ``save_pretrained``, offline.

    make_wan_dir(path)                           Wan 2.1 T2V: WanTransformer3DModel (16 latent channels),
                                                 AutoencoderKLWan (z 16, 4x time, 8x space), UMT5 encoder, UniPC
    make_wan_dir(path, two_experts=True)         Wan 2.2 A14B: + transformer_2 and boundary_ratio
    make_wan_dir(path, ti2v=True)                Wan 2.2 TI2V-5B: z 48, 16x space (2x2 patchify), expand_timesteps
    make_cogvideox_dir(path, layout="2b")        CogVideoX 2B / '5b' (RoPE) / '1.5' (RoPE + 2-frame patches):
                                                 CogVideoXTransformer3DModel, AutoencoderKLCogVideoX (z 16, 4x / 8x),
                                                 T5 encoder, CogVideoXDDIMScheduler

Sizes: 9 pixel frames of 32 x 32 -> 3 latent frames of 4 x 4 (Wan 2.2 TI2V: 2 x 2), a 16-wide text stream of
``TEXT_TOKENS`` tokens; each builds in about a second and samples in a few. The tokenizer is word level (built
with ``tokenizers``): ``WORDS`` plus the words of any ``prompts`` passed in; an unknown word is ``<unk>``.

diffusers / transformers are imported inside the builders, so importing this module costs nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

TEXT_DIM = 16          # d_model of the tiny text encoders = the transformers' text width
TEXT_TOKENS = 8        # tokens per prompt the tests encode (CogVideoX: the transformer's max_text_seq_length)
FRAMES, SIZE = 9, 32   # pixel clip: 9 frames of 32 x 32
WORDS = ("a", "an", "the", "red", "green", "blue", "yellow", "white", "black", "square", "circle", "triangle", "cat",
         "dog", "car", "ball", "moving", "left", "right", "up", "down", "slowly", "quickly", "in", "on", "of", "and",
         "with", "at", "night", "day", "sky", "water", "bad", "blurry", "low", "quality", ",", ".")

PROMPTS_FOR_TESTS = ("a red square moving left", "a blue circle moving up", "a green ball moving right",
                     "a cat on the water", "a dog in the sky at night", "a yellow car moving down",
                     "a white triangle moving left", "a black ball")
"""Eight prompts in the tiny tokenizers' vocabulary (the real-loop tests' prompt file)."""


def word_tokenizer(prompts: Sequence[str] = ()):
    """A word-level ``PreTrainedTokenizerFast`` (pad 0, eos 1, unk 2; ``</s>`` appended) over ``WORDS`` and the
    words of ``prompts``, lower-cased, split on whitespace and punctuation (T5's special-token layout)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = set(WORDS) | {w for p in prompts for w, _ in split.pre_tokenize_str(p.lower())}
    vocab = ["<pad>", "</s>", "<unk>"] + sorted(words)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_encoder(kind: str, vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    fields = dict(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if kind == "umt5":
        return _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**fields)).eval())
    return _seeded(seed, lambda: T5EncoderModel(T5Config(**fields)).eval())


def _randomize_zero_inits(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """diffusers zero-initialises some output layers (a zero output would hide a wrong LoRA or routing): give every
    all-zero parameter N(0, std^2) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ----- Wan 2.1 / 2.2 --------------------------------------------------------------------------------------------
def tiny_wan_transformer(channels: int = 16, *, seed: int = 0, num_layers: int = 1):
    from diffusers import WanTransformer3DModel

    return _randomize_zero_inits(_seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels,
        out_channels=channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=num_layers,
        rope_max_seq_len=32)), seed + 100)


def tiny_wan_vae(*, ti2v: bool = False, seed: int = 0):
    """AutoencoderKLWan: Wan 2.1's geometry (z 16, temporal downsampling [False, True, True] = 4x, three spatial
    downsamplings = 8x), or Wan 2.2 TI2V-5B's (z 48, residual blocks, 2x2 patchify = 16x)."""
    from diffusers import AutoencoderKLWan

    z = 48 if ti2v else 16
    g = torch.Generator().manual_seed(seed + 1)
    mean = (torch.randn(z, generator=g) * 0.3).tolist()
    std = (torch.rand(z, generator=g) * 1.5 + 0.5).tolist()
    extra = (dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16) if ti2v
             else dict(scale_factor_spatial=8))
    return _seeded(seed, lambda: AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                  attn_scales=[], temperal_downsample=[False, True, True],
                                                  latents_mean=mean, latents_std=std, scale_factor_temporal=4,
                                                  **extra).eval())


def make_wan_dir(path, *, two_experts: bool = False, boundary_ratio: float = 0.875, ti2v: bool = False,
                 scheduler: str = "unipc", flow_shift: float = 3.0, prompts: Sequence[str] = (), seed: int = 0,
                 num_layers: int = 1) -> Path:
    """A tiny Wan release at ``path`` (module docstring), saved by ``WanPipeline.save_pretrained``; returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    tokenizer = word_tokenizer(prompts)
    channels = 48 if ti2v else 16
    sched = (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                     flow_shift=flow_shift) if scheduler == "unipc"
             else FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_text_encoder("umt5", len(tokenizer), seed + 2),
                       vae=tiny_wan_vae(ti2v=ti2v, seed=seed + 3), scheduler=sched,
                       transformer=tiny_wan_transformer(channels, seed=seed + 4, num_layers=num_layers),
                       transformer_2=(tiny_wan_transformer(channels, seed=seed + 5, num_layers=num_layers)
                                      if two_experts else None),
                       boundary_ratio=boundary_ratio if two_experts else None, expand_timesteps=ti2v)
    pipe.save_pretrained(str(path))
    return Path(path)


# ----- CogVideoX ------------------------------------------------------------------------------------------------
def tiny_cogvideox_transformer(layout: str = "2b", *, seed: int = 0, num_layers: int = 1):
    """CogVideoXTransformer3DModel over 3 latent frames (9 pixel frames) of 4 x 4, TEXT_TOKENS text tokens."""
    from diffusers import CogVideoXTransformer3DModel

    rope = layout != "2b"
    return _randomize_zero_inits(_seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if rope else 8, in_channels=16, out_channels=16,
        time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=num_layers, sample_width=SIZE // 8,
        sample_height=SIZE // 8, sample_frames=FRAMES, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=rope,
        patch_size_t=2 if layout == "1.5" else None)), seed + 100)


def tiny_cogvideox_vae(*, scaling_factor: float = 0.7, seed: int = 0):
    """AutoencoderKLCogVideoX with CogVideoX's geometry: z 16, 4x time, 8x space (four blocks)."""
    from diffusers import AutoencoderKLCogVideoX

    return _seeded(seed, lambda: AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=16, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, sample_height=SIZE, sample_width=SIZE, scaling_factor=scaling_factor).eval())


def make_cogvideox_dir(path, *, layout: str = "2b", scheduler: str = "ddim", prompts: Sequence[str] = (),
                       seed: int = 0, num_layers: int = 1) -> Path:
    """A tiny CogVideoX release at ``path`` (module docstring), saved by ``CogVideoXPipeline.save_pretrained``."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline

    from vidpo.models.cogvideox import COGVIDEOX_SCHEDULER

    tokenizer = word_tokenizer(prompts)
    sched = (CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler)(**COGVIDEOX_SCHEDULER)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_text_encoder("t5", len(tokenizer), seed + 2),
                             vae=tiny_cogvideox_vae(seed=seed + 3), scheduler=sched,
                             transformer=tiny_cogvideox_transformer(layout, seed=seed + 4, num_layers=num_layers))
    pipe.save_pretrained(str(path))
    return Path(path)


# ----- running a release's own pipeline --------------------------------------------------------------------------
def diffusers_pipeline(path):
    """The diffusers pipeline of a release directory, loaded by its own class (Wan or CogVideoX)."""
    import json

    from diffusers import CogVideoXPipeline, WanPipeline

    cls = WanPipeline if json.loads((path / "model_index.json").read_text())["_class_name"] == "WanPipeline" \
        else CogVideoXPipeline
    return cls.from_pretrained(str(path), local_files_only=True)


def pixel_frames(latent_frames):
    """Pixel frames of a clip of ``latent_frames`` through the 4x-in-time VAEs of both families."""
    return 1 + 4 * (latent_frames - 1)


def pipeline_latents(pipe, noise, cond, neg, steps, cfg, **extra):
    """The pipeline's ``__call__`` from ``noise`` (engine layout (B, C, T, H, W)) with the given embeddings."""
    cog = type(pipe).__name__.startswith("CogVideoX")
    out = pipe(latents=noise.permute(0, 2, 1, 3, 4) if cog else noise, prompt_embeds=cond,
               negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=cfg, height=SIZE, width=SIZE,
               num_frames=pixel_frames(noise.shape[2]), output_type="latent", **extra).frames
    return out.permute(0, 2, 1, 3, 4) if cog else out
