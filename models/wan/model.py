"""Wan 2.1 (diffusers ``WanTransformer3DModel``) behind the engine's model interface (``vidpo.models.adapters``).

Wan is a flow-matching model with exactly the engine's rectified-flow convention: with sigma = t,
``x_t = (1 - t) x0 + t eps`` and the network predicts the velocity ``v ~ eps - x0``. diffusers feeds it
``timestep = 1000 * sigma`` (``FlowMatchEulerDiscreteScheduler``, ``num_train_timesteps = 1000``), so the
adapter's only conversions are ``timestep = 1000 t`` and conditions -> (B, L, text_dim) embeddings. Layout is
already (B, C, T, H, W).

Training-time timesteps: the engine's logit-normal in ``[flow.t_min, flow.t_max]`` (SD3 / Wan fine-tuning
practice); sampling (the sampler hook, ``vidpo.models.sampling``): diffusers' ``FlowMatchEulerDiscreteScheduler``
('flow_euler') or ``UniPCMultistepScheduler`` over flow sigmas ('unipc', the Wan 2.1 releases' scheduler) with
Wan's time shift and CFG. Multi-process layouts: ``vidpo.models.wan.parallelize``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vidpo.models import flow
from vidpo.models.adapters import DiffusersVideoAdapter, TextConditioner

NUM_TRAIN_TIMESTEPS = 1000


def _wan_class():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


class WanAdapter(DiffusersVideoAdapter):
    """``forward(x (B, C, T, H, W), t (B,) in [0, 1], cond) -> velocity (B, C_out, T, H, W)``."""

    parameterization = "flow"
    # 'flow_euler': FlowMatchEulerDiscreteScheduler (Euler over the shifted sigmas); 'unipc':
    # UniPCMultistepScheduler with flow sigmas, the scheduler of the Wan 2.1 diffusers releases.
    SAMPLERS = ("flow_euler", "unipc")

    def __init__(self, transformer, conditioner: Optional[TextConditioner] = None, *, sample_shift: float = 1.0,
                 sampler: Optional[str] = None):
        super().__init__(transformer, conditioner, sampler=sampler)
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

    # ----- sampling (the sampler hook: vidpo.models.sampling over these schedulers) ---------------------------
    def make_scheduler(self, shift: Optional[float] = None):
        """The flow-match Euler scheduler (WanPipeline's loop with ``FlowMatchEulerDiscreteScheduler``)."""
        return self.make_sampling_scheduler("flow_euler", shift=shift)

    def make_sampling_scheduler(self, name: Optional[str] = None, *, shift: Optional[float] = None):
        """A fresh scheduler ``name`` ('flow_euler' | 'unipc'; default ``self.sampler_name``) with time shift
        ``shift`` (default ``self.sample_shift``; Wan 2.1 uses 3.0 at 480p, 5.0 at 720p)."""
        name = name or self.sampler_name
        shift = self.sample_shift if shift is None else float(shift)
        if name == "flow_euler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        if name == "unipc":
            from diffusers import UniPCMultistepScheduler

            return UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=shift, solver_order=2)
        raise ValueError(f"WanAdapter samples with one of {self.SAMPLERS}, not '{name}'")

    def scheduler_model_time(self, scheduler, timestep: torch.Tensor) -> torch.Tensor:
        """WanPipeline feeds the transformer the scheduler's timestep itself; forward multiplies t by 1000."""
        return torch.as_tensor(timestep).double().div(NUM_TRAIN_TIMESTEPS).float()

    def scheduler_level(self, scheduler, index: int) -> float:
        """Flow schedulers integrate over ``sigmas``: the state before step i is x_{sigma_i} (engine t = sigma)."""
        return float(scheduler.sigmas[index])

    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int],
               steps: int = 30, cfg_scale: float = 5.0, shift: Optional[float] = None, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None) -> torch.Tensor:
        """Text-to-video with the flow scheduler (WanPipeline's loop): CFG ``v = v_null + w (v_cond - v_null)``
        then ``scheduler.step`` (Euler: ``x <- x + (sigma_next - sigma) v``). Row k starts from the noise of
        sample ``indices[k]`` (``vidpo.utils.seeding.randn_per_sample``). Returns (B, *shape) fp32."""
        return super().sample(cond, shape, seed=seed, indices=indices, steps=steps, cfg_scale=cfg_scale,
                              stream=stream, null_cond=null_cond, sampler=sampler, shift=shift)

    def sdedit(self, x0: torch.Tensor, cond: torch.Tensor, eta, *, seed: int, indices: Sequence[int],
               steps: int = 30, cfg_scale: float = 5.0, shift: Optional[float] = None, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None) -> torch.Tensor:
        """StructuralDPO's SDEdit: ``x = (1 - sigma_s) x0 + sigma_s eps`` at the first grid sigma <= eta, then
        the scheduler's remaining steps (``vidpo.models.sampling``)."""
        return super().sdedit(x0, cond, eta, seed=seed, indices=indices, steps=steps, cfg_scale=cfg_scale,
                              stream=stream, null_cond=null_cond, sampler=sampler, shift=shift)


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
