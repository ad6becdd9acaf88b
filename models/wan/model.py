"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``) behind the engine's model interface (``vidpo.models.adapters``).

Wan is a flow-matching model with exactly the engine's rectified-flow convention: with sigma = t,
``x_t = (1 - t) x0 + t eps`` and the network predicts the velocity ``v ~ eps - x0``. diffusers feeds it
``timestep = 1000 * sigma`` (``FlowMatchEulerDiscreteScheduler`` / flow-sigma UniPC, ``num_train_timesteps =
1000``), so the adapter's only conversions are ``timestep = 1000 t`` (in float32, as the pipeline feeds it, whatever
the model's dtype) and conditions -> (B, L, text_dim) embeddings. Layout is already (B, C, T, H, W).

Wan 2.2 A14B has two experts: ``transformer`` denoises the high-noise steps and ``transformer_2`` the low-noise
ones. WanPipeline switches at ``boundary_ratio`` (model_index.json, 0.875 for T2V A14B): timestep
``>= boundary_ratio * 1000`` -> ``transformer``, else ``transformer_2``. The adapter holds both and routes each ROW
of a batch by its engine time t (``t * 1000 >= boundary_ratio * 1000``, the same float32 comparison), so one
training batch may feed both experts, each on its own timestep range, each with its own LoRA (``apply_lora`` on the
adapter adapts modules under ``transformer.*`` and ``transformer_2.*``; ``export_lora`` writes one file per expert).
To train one expert only, restrict ``flow.t_min`` / ``flow.t_max`` to its side of the boundary. Wan 2.2 TI2V-5B
(``expand_timesteps``) is a single transformer whose pipeline feeds per-token timesteps; for text-to-video every
token has the same timestep, and the scalar-timestep forward computes the same thing.

Training-time timesteps: the engine's logit-normal in ``[flow.t_min, flow.t_max]`` (SD3 / Wan fine-tuning
practice); sampling (the sampler hook, ``vidpo.models.sampling``): diffusers' ``FlowMatchEulerDiscreteScheduler``
('flow_euler') or ``UniPCMultistepScheduler`` over flow sigmas ('unipc', the releases' scheduler) with Wan's time
shift and CFG (``cfg_scale_2``: WanPipeline's ``guidance_scale_2`` for the low-noise expert). A model loaded from a
release samples with the release's scheduler config and shift unless told otherwise. Multi-process layouts:
``vidpo.models.wan.parallelize``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vidpo.models import flow
from vidpo.models.adapters import DiffusersVideoAdapter, TextConditioner, eval_mode

NUM_TRAIN_TIMESTEPS = 1000
# The release's scheduler class -> the sampler name that rebuilds it.
SCHEDULER_SAMPLERS = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "flow_euler"}


def _wan_class():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


class WanAdapter(DiffusersVideoAdapter):
    """``forward(x (B, C, T, H, W), t (B,) in [0, 1], cond) -> velocity (B, C_out, T, H, W)``; with
    ``transformer_2`` and ``boundary_ratio`` (Wan 2.2 A14B) each row goes to its expert (module docstring)."""

    parameterization = "flow"
    family = "wan"
    TRANSFORMER_CLASS = "WanTransformer3DModel"
    PIPELINE_CLASS = "WanPipeline"
    # 'flow_euler': FlowMatchEulerDiscreteScheduler (Euler over the shifted sigmas); 'unipc':
    # UniPCMultistepScheduler with flow sigmas, the scheduler of the Wan 2.1 / 2.2 diffusers releases.
    SAMPLERS = ("flow_euler", "unipc")

    def __init__(self, transformer, conditioner: Optional[TextConditioner] = None, *,
                 transformer_2=None, boundary_ratio: Optional[float] = None,
                 scheduler_config: Optional[dict] = None, sample_shift: Optional[float] = None,
                 sampler: Optional[str] = None):
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("Wan 2.2's two experts need both transformer_2 and boundary_ratio")
        if boundary_ratio is not None and not 0.0 < float(boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        config = dict(scheduler_config) if scheduler_config else None
        if sampler is None and config is not None:
            sampler = SCHEDULER_SAMPLERS.get(config.get("_class_name"))
        super().__init__(transformer, conditioner, sampler=sampler)
        self.transformer_2 = transformer_2
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.release_scheduler = config
        if sample_shift is None:
            sample_shift = _config_shift(config) if config is not None else 1.0
        self.sample_shift = float(sample_shift)

    @classmethod
    def pipeline_kwargs(cls, pipe, *, device=None, dtype=None) -> dict:
        """The release's scheduler config and, for Wan 2.2 A14B, the low-noise expert and the boundary."""
        kwargs = {"scheduler_config": pipe.scheduler_config()} if pipe.has("scheduler") else {}
        if "transformer_2" in pipe.experts:
            kwargs.update(transformer_2=pipe.transformer("transformer_2", device=device, dtype=dtype),
                          boundary_ratio=pipe.boundary_ratio)
        return kwargs

    def index_entries(self) -> dict:
        return {} if self.boundary_ratio is None else {"boundary_ratio": self.boundary_ratio}

    def scheduler_config(self) -> Optional[dict]:
        return self.release_scheduler

    # ----- the forward pass (both experts) -----------------------------------------------------------------
    def high_noise(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows ``transformer`` (the high-noise expert) takes; all True without a second expert."""
        t = torch.as_tensor(t)
        if self.boundary_ratio is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        return t.float() * NUM_TRAIN_TIMESTEPS >= self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def timestep_ranges(self) -> dict[str, tuple[float, float]]:
        """The engine-time range each expert serves: ``{"transformer": (boundary, 1), "transformer_2": (0,
        boundary)}`` (the boundary itself belongs to ``transformer``); ``{"transformer": (0, 1)}`` for one."""
        if self.boundary_ratio is None:
            return {"transformer": (0.0, 1.0)}
        return {"transformer": (self.boundary_ratio, 1.0), "transformer_2": (0.0, self.boundary_ratio)}

    def _expert_forward(self, expert, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return expert(hidden_states=x.to(self.dtype), timestep=t.float() * NUM_TRAIN_TIMESTEPS,
                      encoder_hidden_states=emb, return_dict=False)[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected x of shape (B, C, T, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.encode_condition(cond)
        if self.transformer_2 is None:
            return self._expert_forward(self.transformer, x, t, emb)
        high = self.high_noise(t)
        if bool(high.all()):
            return self._expert_forward(self.transformer, x, t, emb)
        if not bool(high.any()):
            return self._expert_forward(self.transformer_2, x, t, emb)
        rows_high, rows_low = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
        out = torch.cat([self._expert_forward(self.transformer, x[rows_high], t[rows_high], emb[rows_high]),
                         self._expert_forward(self.transformer_2, x[rows_low], t[rows_low], emb[rows_low])])
        return out[torch.argsort(torch.cat([rows_high, rows_low]))]

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
        ``shift`` (default ``self.sample_shift``; Wan 2.1 uses 3.0 at 480p, 5.0 at 720p). When the release's
        scheduler is of that class, its config is kept (solver order, sigma options) and only the shift set."""
        name = name or self.sampler_name
        shift = self.sample_shift if shift is None else float(shift)
        release = self.release_scheduler if self.release_scheduler is not None else {}
        same = SCHEDULER_SAMPLERS.get(release.get("_class_name")) == name
        if name == "flow_euler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            if same:
                return FlowMatchEulerDiscreteScheduler.from_config(release, shift=shift)
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        if name == "unipc":
            from diffusers import UniPCMultistepScheduler

            if same:
                return UniPCMultistepScheduler.from_config(release, flow_shift=shift)
            return UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=shift, solver_order=2)
        raise ValueError(f"WanAdapter samples with one of {self.SAMPLERS}, not '{name}'")

    def scheduler_model_time(self, scheduler, timestep: torch.Tensor) -> torch.Tensor:
        """WanPipeline feeds the transformer the scheduler's timestep itself; forward multiplies t by 1000."""
        return torch.as_tensor(timestep).double().div(NUM_TRAIN_TIMESTEPS).float()

    def scheduler_level(self, scheduler, index: int) -> float:
        """Flow schedulers integrate over ``sigmas``: the state before step i is x_{sigma_i} (engine t = sigma)."""
        return float(scheduler.sigmas[index])

    def _two_scale_sampler(self, sampler: Optional[str], shift: Optional[float], cfg_scale: float,
                           cfg_scale_2: float):
        """A sampler whose model does WanPipeline's CFG itself, ``guidance_scale`` on the high-noise expert's rows
        and ``guidance_scale_2`` on the low-noise one's; it takes ``cat([cond, null], dim=1)`` as its condition
        (the sampler's row selection keeps both halves together) and is run with cfg 1."""
        engine = self.sampler(sampler, shift=shift)
        model_fn = engine.model_fn

        def guided(x, t, packed):
            cond, null = packed.chunk(2, dim=1)
            v_cond, v_null = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
            w = torch.where(self.high_noise(t), cfg_scale, cfg_scale_2).to(v_cond).view(-1, *[1] * (x.dim() - 1))
            return v_null + w * (v_cond - v_null)
        engine.model_fn = guided
        return engine

    def _guidance(self, cond, null_cond, cfg_scale, cfg_scale_2, sampler, shift):
        null = self.null_condition(cond) if null_cond is None else null_cond
        if cfg_scale_2 is None or self.boundary_ratio is None or float(cfg_scale_2) == float(cfg_scale):
            return None, null
        if null.shape != cond.shape:
            raise ValueError(f"cfg_scale_2 needs a null condition shaped like the condition: {tuple(null.shape)} "
                             f"vs {tuple(cond.shape)}")
        return self._two_scale_sampler(sampler, shift, float(cfg_scale), float(cfg_scale_2)), null

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int],
               steps: int = 30, cfg_scale: float = 5.0, shift: Optional[float] = None, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None,
               cfg_scale_2: Optional[float] = None) -> torch.Tensor:
        """Text-to-video with the flow scheduler (WanPipeline's loop): CFG ``v = v_null + w (v_cond - v_null)``
        (``w = cfg_scale_2`` on the low-noise expert's steps when given: WanPipeline's ``guidance_scale_2``) then
        ``scheduler.step``. Row k starts from the noise of sample ``indices[k]``
        (``vidpo.utils.seeding.randn_per_sample``). Returns (B, *shape) fp32."""
        engine, null = self._guidance(cond, null_cond, cfg_scale, cfg_scale_2, sampler, shift)
        if engine is None:
            return super().sample(cond, shape, seed=seed, indices=indices, steps=steps, cfg_scale=cfg_scale,
                                  stream=stream, null_cond=null, sampler=sampler, shift=shift)
        with eval_mode(self):
            return engine.sample(torch.cat([cond, null], dim=1), shape, seed=seed, indices=indices, steps=steps,
                                 cfg_scale=1.0, stream=stream, null_cond=None, device=self._device())

    @torch.no_grad()
    def sdedit(self, x0: torch.Tensor, cond: torch.Tensor, eta, *, seed: int, indices: Sequence[int],
               steps: int = 30, cfg_scale: float = 5.0, shift: Optional[float] = None, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None,
               cfg_scale_2: Optional[float] = None) -> torch.Tensor:
        """StructuralDPO's SDEdit: ``x = (1 - sigma_s) x0 + sigma_s eps`` at the first grid sigma <= eta, then
        the scheduler's remaining steps (``vidpo.models.sampling``)."""
        engine, null = self._guidance(cond, null_cond, cfg_scale, cfg_scale_2, sampler, shift)
        if engine is None:
            return super().sdedit(x0, cond, eta, seed=seed, indices=indices, steps=steps, cfg_scale=cfg_scale,
                                  stream=stream, null_cond=null, sampler=sampler, shift=shift)
        with eval_mode(self):
            return engine.sdedit(x0.to(self._device()), torch.cat([cond, null], dim=1), eta, seed=seed,
                                 indices=indices, steps=steps, cfg_scale=1.0, stream=stream, null_cond=None)


def _config_shift(config: dict) -> float:
    """The time shift a release's scheduler config samples with (UniPC's ``flow_shift``, flow-match Euler's
    ``shift``; 1.0 when it has neither)."""
    for key in ("flow_shift", "shift"):
        if config.get(key) is not None:
            return float(config[key])
    return 1.0


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
