"""CogVideoX (diffusers ``CogVideoXTransformer3DModel``) behind the engine's model interface.

CogVideoX is a v-prediction DDPM model, not a flow: with ``abar_k`` the scheduler's cumulative alphas at the
integer timestep ``k`` (``CogVideoXDDIMScheduler``: scaled-linear betas, zero-terminal-SNR rescaling,
SNR shift 3), ``alpha_k = sqrt(abar_k)``, ``sigma_k = sqrt(1 - abar_k)``:

    x_k = alpha_k x0 + sigma_k eps              (``scheduler.add_noise``)
    v   = alpha_k eps - sigma_k x0              (``scheduler.get_velocity``; the network's target)

so its preference objective is Diffusion-DPO in the v form (``err = ||v_theta(x_k) - v||^2``, same DPO /
DenseDPO / KTO formulas as DESIGN.md section 1), with ``k`` uniform over the scheduler's training timesteps.

Engine time: ``t = k / (N - 1)`` in [0, 1] (N = 1000), so t = 1 is the (zero-SNR) pure-noise end as in the
flow models; ``forward`` maps it back with ``k = round(t (N - 1))``, exact for the values
``sample_timesteps`` draws. Layout: diffusers' CogVideoX transformer takes (B, T, C, H, W); the adapter permutes
(its VAE takes (B, C, T, H, W), as the engine's latents are).

Releases (``vidpo.models.pipeline_dir``): CogVideoX-2B (sincos positions), 5B (3-D RoPE, which the adapter
computes as CogVideoXPipeline does) and 1.5 (RoPE + 2-frame temporal patches: the latent frame count must be even,
where CogVideoXPipeline would pad it); the release's scheduler config replaces ``COGVIDEOX_SCHEDULER``.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import torch

from vidpo.models.adapters import DiffusersVideoAdapter, TextConditioner

# CogVideoX-2B's scheduler (its scheduler/scheduler_config.json), built here so no hub file is needed.
COGVIDEOX_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                           rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing")


def _cogvideox_class():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel


def _centre_crop_region(grid: tuple[int, int], base: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """CogVideoX 1.0's RoPE crop: the clip's (rows, cols) patch grid resized to fit the training grid ``base``
    (rows, cols) at its own aspect ratio and centred in it; returns ((top, left), (bottom, right))."""
    (rows, cols), (base_rows, base_cols) = grid, base
    if rows / cols > base_rows / base_cols:      # taller than the training grid: full height
        height, width = base_rows, int(round(base_rows / rows * cols))
    else:
        height, width = int(round(base_cols / cols * rows)), base_cols
    top, left = int(round((base_rows - height) / 2.0)), int(round((base_cols - width) / 2.0))
    return (top, left), (top + height, left + width)


def make_scheduler(**overrides):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**{**COGVIDEOX_SCHEDULER, **overrides})


class CogVideoXAdapter(DiffusersVideoAdapter):
    """``forward(x (B, C, T, H, W), t (B,) in [0, 1], cond) -> v-prediction (B, C, T, H, W)``.

    ``scheduler``: the model's DDPM (its betas, rescaling and SNR shift drive ``interpolate`` / ``training_target``
    and every sampler); a release's own scheduler config when loaded from one (``pipeline_kwargs``), whose class
    also picks the default sampler."""

    parameterization = "v_prediction"
    family = "cogvideox"
    TRANSFORMER_CLASS = "CogVideoXTransformer3DModel"
    PIPELINE_CLASS = "CogVideoXPipeline"
    # 'ddim': CogVideoXDDIMScheduler (deterministic, eta = 0; CogVideoX-2B's default); 'dpm':
    # CogVideoXDPMScheduler (DPM-Solver++ 2M SDE, CogVideoX-5B's default; fresh noise at every step).
    SAMPLERS = ("ddim", "dpm")
    SCHEDULER_SAMPLERS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}

    def __init__(self, transformer, conditioner: Optional[TextConditioner] = None, *, scheduler=None,
                 sampler: Optional[str] = None):
        if scheduler is not None and sampler is None:
            sampler = self.SCHEDULER_SAMPLERS.get(type(scheduler).__name__)
        super().__init__(transformer, conditioner, sampler=sampler)
        self.scheduler = scheduler if scheduler is not None else make_scheduler()
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    @classmethod
    def pipeline_kwargs(cls, pipe, *, device=None, dtype=None) -> dict:
        """The release's scheduler (CogVideoXDDIMScheduler or CogVideoXDPMScheduler, from its config)."""
        return {"scheduler": pipe.scheduler()} if pipe.has("scheduler") else {}

    def scheduler_config(self) -> Optional[dict]:
        return json.loads(self.scheduler.to_json_string())

    def discrete_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Engine time (B,) in [0, 1] -> integer DDPM timesteps ``round(t (N - 1))`` (B,) long."""
        return torch.round(t.double() * (self.num_train_timesteps - 1)).long().clamp(0, self.num_train_timesteps - 1)

    def rotary_embedding(self, frames: int, height: int, width: int,
                         device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The 3-D RoPE (cos, sin) of a latent clip of ``frames x height x width`` for CogVideoX-5B / 1.5
        (``use_rotary_positional_embeddings``), None for 2B's sincos position embeddings.

        Why here: diffusers' transformer does not compute its RoPE, the pipeline does
        (``CogVideoXPipeline._prepare_rotary_positional_embeddings``) and passes it in; without it a 5B model
        runs with no position information at all. Same grid as the pipeline: 1.0 models crop the grid of
        ``sample_height x sample_width`` (in patches) to the clip's aspect ratio; 1.5 models (temporal patches,
        ``patch_size_t``) use a 'slice' grid of that maximum size. Cached per clip shape and device."""
        config = self.transformer.config
        if not getattr(config, "use_rotary_positional_embeddings", False):
            return None
        key = (frames, height, width, str(device))
        cache = self.__dict__.setdefault("_rope_cache", {})
        if key not in cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            p, p_t = config.patch_size, config.patch_size_t
            grid = (height // p, width // p)
            base = (config.sample_height // p, config.sample_width // p)
            if p_t is None:
                cache[key] = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim,
                                                     crops_coords=_centre_crop_region(grid, base), grid_size=grid,
                                                     temporal_size=frames, device=device)
            else:
                cache[key] = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None,
                                                     grid_size=grid, temporal_size=(frames + p_t - 1) // p_t,
                                                     grid_type="slice", max_size=base, device=device)
        return cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected x of shape (B, C, T, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        hidden = x.to(self.dtype).permute(0, 2, 1, 3, 4)           # diffusers' (B, T, C, H, W)
        out = self.transformer(hidden_states=hidden, encoder_hidden_states=self.encode_condition(cond),
                               timestep=self.discrete_timesteps(t),
                               image_rotary_emb=self.rotary_embedding(*x.shape[2:], x.device), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)

    # ----- diffusion process hooks (DDPM, v-prediction) --------------------------------------------------
    def _k(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(like.device)
        return self.discrete_timesteps(torch.as_tensor(t, device=like.device)).to(like.device)

    def interpolate(self, x0, noise, t):
        """``x_k = alpha_k x0 + sigma_k eps`` (the scheduler's ``add_noise``)."""
        return self.scheduler.add_noise(x0, noise, self._k(t, x0))

    def training_target(self, x0, noise, t):
        """``v = alpha_k eps - sigma_k x0`` (the scheduler's ``get_velocity``)."""
        return self.scheduler.get_velocity(x0, noise, self._k(t, x0))

    def sample_timesteps(self, n: int, generator: torch.Generator, flow_cfg=None) -> torch.Tensor:
        """Uniform integer ``k`` (Diffusion-DPO / CogVideoX training), restricted to engine times in
        ``[flow.t_min, flow.t_max]`` when given; returned as engine time ``k / (N - 1)``."""
        top = self.num_train_timesteps - 1
        lo, hi = (0, top) if flow_cfg is None else (int(round(flow_cfg.t_min * top)), int(round(flow_cfg.t_max * top)))
        k = torch.randint(lo, hi + 1, (n,), generator=generator)
        return k.double().div(top).float()

    # ----- sampling (the sampler hook: vidpo.models.sampling over these schedulers) ---------------------------
    def make_sampling_scheduler(self, name: Optional[str] = None):
        """A fresh 'ddim' or 'dpm' scheduler (default ``self.sampler_name``) with this model's scheduler
        config (betas, zero-terminal-SNR rescaling, SNR shift, trailing spacing, v-prediction)."""
        from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

        name = name or self.sampler_name
        classes = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
        if name not in classes:
            raise ValueError(f"CogVideoXAdapter samples with one of {self.SAMPLERS}, not '{name}'")
        return classes[name].from_config(self.scheduler.config)

    def scheduler_model_time(self, scheduler, timestep: torch.Tensor) -> torch.Tensor:
        """Integer timestep k -> engine time k / (N - 1), which ``forward`` maps back to k exactly."""
        return torch.as_tensor(timestep).double().div(self.num_train_timesteps - 1).float()

    def scheduler_level(self, scheduler, index: int) -> float:
        """The state before step i is x_k at k = timesteps[i] (``add_noise`` at k = ``interpolate`` at k/(N-1))."""
        return float(scheduler.timesteps[index]) / (self.num_train_timesteps - 1)

    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int],
               steps: int = 50, cfg_scale: float = 6.0, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None) -> torch.Tensor:
        """Text-to-video with ``CogVideoXDDIMScheduler`` (deterministic DDIM, eta = 0) or ``CogVideoXDPMScheduler``
        and CFG ``v = v_null + w (v_cond - v_null)``: CogVideoXPipeline's loop. Returns (B, *shape) fp32."""
        return super().sample(cond, shape, seed=seed, indices=indices, steps=steps, cfg_scale=cfg_scale,
                              stream=stream, null_cond=null_cond, sampler=sampler)

    def sdedit(self, x0: torch.Tensor, cond: torch.Tensor, eta, *, seed: int, indices: Sequence[int],
               steps: int = 50, cfg_scale: float = 6.0, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None) -> torch.Tensor:
        """SDEdit: ``x_k = alpha_k x0 + sigma_k eps`` at the first grid timestep k with k / 999 <= eta, then the
        scheduler's remaining steps (CogVideoXVideoToVideoPipeline's strength, on the engine's eta)."""
        return super().sdedit(x0, cond, eta, seed=seed, indices=indices, steps=steps, cfg_scale=cfg_scale,
                              stream=stream, null_cond=null_cond, sampler=sampler)


def tiny_cogvideox_transformer(*, in_channels: int = 4, text_dim: int = 16, text_len: int = 3, frames: int = 4,
                               size: int = 8, num_layers: int = 1, seed: int = 0, layout: str = "2b"):
    """A randomly initialised tiny ``CogVideoXTransformer3DModel`` for CPU tests; ``frames`` latent frames,
    ``text_len`` text tokens. ``layout``: '2b' (sincos position embeddings, no temporal patching), '5b' (3-D
    RoPE instead) or '1.5' (RoPE and 2-frame temporal patches)."""
    if layout not in ("2b", "5b", "1.5"):
        raise ValueError(f"layout must be '2b', '5b' or '1.5', got {layout!r}")
    rope = layout != "2b"
    extra = dict(use_rotary_positional_embeddings=rope, patch_size_t=2 if layout == "1.5" else None)
    # RoPE splits a head's features 1/4 time, 3/8 height, 3/8 width, each of even size: 16 is the least head size
    head_dim = 16 if rope else 8
    cls = _cogvideox_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(num_attention_heads=2, attention_head_dim=head_dim, in_channels=in_channels,
                   out_channels=in_channels, time_embed_dim=16, text_embed_dim=text_dim, num_layers=num_layers,
                   sample_width=size, sample_height=size, sample_frames=frames, temporal_compression_ratio=1,
                   patch_size=2, max_text_seq_length=text_len, **extra)
