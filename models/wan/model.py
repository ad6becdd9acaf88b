"""Wan 2.1 (diffusers ``WanTransformer3DModel``) behind the engine's model interface (``vidpo.models.adapters``).

Wan is a flow-matching model with exactly the engine's rectified-flow convention: with sigma = t,
``x_t = (1 - t) x0 + t eps`` and the network predicts the velocity ``v ~ eps - x0``. diffusers feeds it
``timestep = 1000 * sigma`` (``FlowMatchEulerDiscreteScheduler``, ``num_train_timesteps = 1000``), so the
adapter's only conversions are ``timestep = 1000 t`` and conditions -> (B, L, text_dim) embeddings. Layout is
already (B, C, T, H, W).

Training-time timesteps: the engine's logit-normal in ``[flow.t_min, flow.t_max]`` (SD3 / Wan fine-tuning
practice); sampling: diffusers' ``FlowMatchEulerDiscreteScheduler`` with Wan's time shift and CFG.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vidpo.models import flow
from vidpo.models.adapters import DiffusersVideoAdapter, TextConditioner
from vidpo.seeding import randn_per_sample

NUM_TRAIN_TIMESTEPS = 1000


def _wan_class():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


class WanAdapter(DiffusersVideoAdapter):
    """``forward(x (B, C, T, H, W), t (B,) in [0, 1], cond) -> velocity (B, C_out, T, H, W)``."""

    parameterization = "flow"

    def __init__(self, transformer, conditioner: Optional[TextConditioner] = None, *, sample_shift: float = 1.0):
        super().__init__(transformer, conditioner)
        self.sample_shift = float(sample_shift)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.transformer_class = _wan_class()
        return super().from_pretrained(path, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected x of shape (B, C, T, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        out = self.transformer(hidden_states=x.to(self.dtype), timestep=t.to(self.dtype) * NUM_TRAIN_TIMESTEPS,
                               encoder_hidden_states=self.encode_condition(cond), return_dict=False)[0]
        return out

    # ----- diffusion process hooks (the rectified flow itself) -------------------------------------------
    def interpolate(self, x0, noise, t):
        return flow.interpolate(x0, noise, t)

    def training_target(self, x0, noise, t):
        """Velocity ``u = eps - x0`` (independent of t)."""
        return flow.velocity_target(x0, noise)

    def sample_timesteps(self, n: int, generator: torch.Generator, flow_cfg=None) -> torch.Tensor:
        kw = {} if flow_cfg is None else dict(logit_mean=flow_cfg.logit_mean, logit_std=flow_cfg.logit_std,
                                               t_min=flow_cfg.t_min, t_max=flow_cfg.t_max)
        return flow.sample_timesteps(n, generator, **kw)

    # ----- sampling -----------------------------------------------------------------------------------
    def make_scheduler(self, shift: Optional[float] = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                               shift=self.sample_shift if shift is None else shift)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int],
               steps: int = 30, cfg_scale: float = 5.0, shift: Optional[float] = None, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text-to-video with ``FlowMatchEulerDiscreteScheduler`` (WanPipeline's loop): CFG
        ``v = v_null + w (v_cond - v_null)`` then ``x <- x + (sigma_next - sigma) v``. Row k starts from the
        noise of sample ``indices[k]`` (``vidpo.seeding.randn_per_sample``). Returns (B, *shape) fp32."""
        device = next(self.parameters()).device
        x = randn_per_sample((len(indices),) + tuple(shape), seed, indices, stream, device=device)
        scheduler = self.make_scheduler(shift)
        scheduler.set_timesteps(steps, device=device)
        null = self.null_condition(cond) if null_cond is None else null_cond
        for timestep in scheduler.timesteps:
            t = (timestep / NUM_TRAIN_TIMESTEPS).expand(x.shape[0])
            v = flow.guided_velocity(lambda a, b, c: self(a, b, c).float(), x, t, cond, null, cfg_scale)
            x = scheduler.step(v, timestep, x, return_dict=False)[0]
        return x.float()


def tiny_wan_transformer(*, in_channels: int = 3, text_dim: int = 16, num_layers: int = 1, seed: int = 0):
    """A randomly initialised ~7k-parameter ``WanTransformer3DModel`` for CPU tests and the demo."""
    cls = _wan_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                   out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=num_layers,
                   rope_max_seq_len=32)


def make_tiny_wan_dir(path, *, vocab_size: int, in_channels: int = 3, text_dim: int = 16, num_layers: int = 1,
                      seed: int = 0) -> WanAdapter:
    """Write a tiny Wan model directory (transformer/ + text_conditioner.safetensors for ``vocab_size``
    condition tokens) that ``model.kind=wan, model.path=<path>`` loads; returns the adapter."""
    adapter = WanAdapter(tiny_wan_transformer(in_channels=in_channels, text_dim=text_dim, num_layers=num_layers,
                                              seed=seed), TextConditioner.random(vocab_size, text_dim, seed + 1))
    adapter.save_pretrained(path)
    return adapter
