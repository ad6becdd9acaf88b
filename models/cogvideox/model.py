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
``sample_timesteps`` draws. Layout: diffusers' CogVideoX takes (B, T, C, H, W); the adapter permutes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vidpo.models import flow
from vidpo.models.adapters import DiffusersVideoAdapter, TextConditioner
from vidpo.seeding import randn_per_sample

# CogVideoX-2B's scheduler (its scheduler/scheduler_config.json), built here so no hub file is needed.
COGVIDEOX_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                           rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing")


def _cogvideox_class():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel


def make_scheduler(**overrides):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**{**COGVIDEOX_SCHEDULER, **overrides})


class CogVideoXAdapter(DiffusersVideoAdapter):
    """``forward(x (B, C, T, H, W), t (B,) in [0, 1], cond) -> v-prediction (B, C, T, H, W)``."""

    parameterization = "v_prediction"

    def __init__(self, transformer, conditioner: Optional[TextConditioner] = None, *, scheduler=None):
        super().__init__(transformer, conditioner)
        self.scheduler = scheduler if scheduler is not None else make_scheduler()
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.transformer_class = _cogvideox_class()
        return super().from_pretrained(path, **kwargs)

    def discrete_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Engine time (B,) in [0, 1] -> integer DDPM timesteps ``round(t (N - 1))`` (B,) long."""
        return torch.round(t.double() * (self.num_train_timesteps - 1)).long().clamp(0, self.num_train_timesteps - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected x of shape (B, C, T, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        hidden = x.to(self.dtype).permute(0, 2, 1, 3, 4)           # diffusers' (B, T, C, H, W)
        out = self.transformer(hidden_states=hidden, encoder_hidden_states=self.encode_condition(cond),
                               timestep=self.discrete_timesteps(t), return_dict=False)[0]
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

    # ----- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int],
               steps: int = 50, cfg_scale: float = 6.0, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text-to-video with ``CogVideoXDDIMScheduler`` (deterministic DDIM, eta = 0) and CFG
        ``v = v_null + w (v_cond - v_null)``, CogVideoXPipeline's loop. Returns (B, *shape) fp32."""
        device = next(self.parameters()).device
        x = randn_per_sample((len(indices),) + tuple(shape), seed, indices, stream, device=device)
        scheduler = make_scheduler(**dict(self.scheduler.config))
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        null = self.null_condition(cond) if null_cond is None else null_cond
        top = self.num_train_timesteps - 1
        for timestep in scheduler.timesteps:
            t = (timestep.double() / top).float().expand(x.shape[0]).to(device)
            v = flow.guided_velocity(lambda a, b, c: self(a, b, c).float(), x, t, cond, null, cfg_scale)
            x = scheduler.step(v, timestep, x, return_dict=False)[0]
        return x.float()


def tiny_cogvideox_transformer(*, in_channels: int = 4, text_dim: int = 16, text_len: int = 3, frames: int = 4,
                               size: int = 8, num_layers: int = 1, seed: int = 0):
    """A randomly initialised tiny ``CogVideoXTransformer3DModel`` (CogVideoX-2B's layout: sincos position
    embeddings, no temporal patching) for CPU tests; ``frames`` latent frames, ``text_len`` text tokens."""
    cls = _cogvideox_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=in_channels,
                   time_embed_dim=16, text_embed_dim=text_dim, num_layers=num_layers, sample_width=size,
                   sample_height=size, sample_frames=frames, temporal_compression_ratio=1, patch_size=2,
                   max_text_seq_length=text_len)
