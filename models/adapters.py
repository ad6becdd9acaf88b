"""The engine's model interface for diffusers video transformers (Wan 2.1, CogVideoX), and what they share.

Every policy the engine trains is called as ``model(x, t, cond)``:
  * ``x``    (B, C, T, H, W) latent (or, for tiny test models, pixel) video, channels first;
  * ``t``    (B,) float in [0, 1], the ENGINE's time: 0 = data, 1 = pure noise;
  * ``cond`` (B, L, D) float text embeddings (umT5 / T5 4096-d for the real models), or (B, L) long token
             ids that the adapter's ``TextConditioner`` maps to fixed embeddings (the shapes world's
             condition tokens, id 0 = null);
and returns the model's prediction in x's layout. A diffusers adapter adds the hooks through which the
objectives and the samplers stay parameterization-agnostic (the toy DiT has none of them, and the engine
then uses rectified flow, ``vidpo.models.flow``):

  ``interpolate(x0, noise, t)``           the forward process x_t;
  ``training_target(x0, noise, t)``       what ``forward`` regresses on (velocity eps - x0 for flow matching,
                                          v = alpha_t eps - sigma_t x0 for v-prediction DDPM);
  ``sample_timesteps(n, generator, flow)`` the model's own training-time distribution, in engine time;
  ``null_condition(cond)``                the classifier-free-guidance null (all-zero embeddings / id 0);
  ``sample(cond, shape, seed, indices, ...)`` text-to-video sampling with the model's own diffusers
                                          scheduler and CFG (the sampler hook, ``vidpo.models.sampling``);
  ``sdedit(x0, cond, eta, seed, indices, ...)`` SDEdit / StructuralDPO re-generation on the same scheduler;
  ``export_lora(path)``                   adapters in diffusers' format (``pipe.load_lora_weights(path)``).

A model directory is a diffusers pipeline-style folder: ``transformer/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``) and, optionally, ``text_conditioner.safetensors``; or a bare
transformer folder. Nothing is downloaded: every loader takes a local path.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vidpo.models.dit.parallelize import whole_clip
from vidpo.models.lora import save_lora
from vidpo.models.sampling import SamplerSpec, SchedulerSampler

CONDITIONER_FILE = "text_conditioner.safetensors"
# Attention projections of both diffusers transformers (self- and cross-attention), their LoRA targets.
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TextConditioner(nn.Module):
    """Fixed "prompt embeddings" for token-id conditions: ``(B, L) long -> (B, L, D)``, row 0 = zeros (null).

    Stands in for the text encoder where the conditions are a small closed vocabulary (the shapes world):
    it is a frozen buffer, saved with the model directory, so a model and its conditions travel together.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        if table.dim() != 2:
            raise ValueError(f"TextConditioner table must be (vocab, dim), got {tuple(table.shape)}")
        table = table.clone()
        table[0] = 0.0
        self.register_buffer("table", table)

    @classmethod
    def random(cls, vocab_size: int, dim: int, seed: int = 0) -> "TextConditioner":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(vocab_size, dim, generator=g))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]

    def save(self, directory: str | os.PathLike) -> None:
        save_file({"table": self.table.detach().cpu().contiguous()}, str(Path(directory) / CONDITIONER_FILE))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Optional["TextConditioner"]:
        path = Path(directory) / CONDITIONER_FILE
        if not path.exists():
            return None

        return cls(load_file(str(path))["table"])


@contextmanager
def _eval_mode(model: nn.Module):
    """Sampling runs the network in eval mode (no dropout) and restores the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def transformer_dir(path: str | os.PathLike) -> Path:
    """The diffusers transformer folder of a model directory (``<path>/transformer`` or ``<path>``)."""
    p = Path(path)
    for candidate in (p / "transformer", p):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"no diffusers transformer at '{path}': expected config.json in it or in "
                            f"its 'transformer/' subfolder")


class DiffusersVideoAdapter(nn.Module):
    """Shared part of the adapters: condition encoding, null condition, save / load, LoRA export, and the
    sampler hook (``sample`` / ``sdedit`` through ``vidpo.models.sampling.SchedulerSampler``).

    A subclass names its schedulers in ``SAMPLERS`` (the first is the default) and says how its scheduler's
    timesteps map to engine time: ``make_sampling_scheduler(name, **overrides)``, ``scheduler_model_time``,
    ``scheduler_level`` (see ``vidpo.models.sampling.SamplerSpec``)."""

    transformer_class = None  # set by subclasses (a diffusers ModelMixin)
    SAMPLERS: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module, conditioner: Optional[TextConditioner] = None, *,
                 sampler: Optional[str] = None):
        super().__init__()
        self.transformer = transformer
        self.conditioner = conditioner
        if sampler is not None and sampler not in self.SAMPLERS:
            raise ValueError(f"{type(self).__name__} samples with one of {self.SAMPLERS}, not '{sampler}'")
        self.sampler_name = sampler or self.SAMPLERS[0]

    # ----- conditions -------------------------------------------------------------------------------
    def encode_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, L, D) embeddings in the transformer's dtype; token ids go through the TextConditioner."""
        if not cond.is_floating_point():
            if self.conditioner is None:
                raise TypeError("this model has no TextConditioner: pass text embeddings (B, L, D), not token ids")
            cond = self.conditioner(cond)
        if cond.dim() != 3:
            raise ValueError(f"expected text embeddings (B, L, D), got shape {tuple(cond.shape)}")
        return cond.to(self.dtype)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """All-zero embeddings (or id-0 tokens, which the conditioner maps to zeros) shaped like ``cond``."""
        return torch.zeros_like(cond)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ----- sampling: the model's own scheduler ---------------------------------------------------------
    def make_sampling_scheduler(self, name: Optional[str] = None, **overrides):
        raise NotImplementedError

    def scheduler_model_time(self, scheduler, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scheduler_level(self, scheduler, index: int) -> float:
        raise NotImplementedError

    def sampler(self, name: Optional[str] = None, **overrides):
        """A ``SchedulerSampler`` over this model with scheduler ``name`` (default: ``self.sampler_name``)."""
        spec = SamplerSpec(make_scheduler=lambda: self.make_sampling_scheduler(name, **overrides),
                           model_time=self.scheduler_model_time, level=self.scheduler_level,
                           interpolate=self.interpolate)
        return SchedulerSampler(lambda x, t, c: self(x, t, c).float(), spec)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int],
               steps: int = 50, cfg_scale: float = 5.0, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None, **overrides) -> torch.Tensor:
        """Text-to-video ``(len(indices), *shape)`` fp32 with the model's scheduler and CFG
        ``pred = pred_null + w (pred_cond - pred_null)``; row k starts from the noise of sample ``indices[k]``."""
        null = self.null_condition(cond) if null_cond is None else null_cond
        with _eval_mode(self):
            return self.sampler(sampler, **overrides).sample(cond, shape, seed=seed, indices=indices, steps=steps,
                                                             cfg_scale=cfg_scale, stream=stream, null_cond=null,
                                                             device=self._device())

    @torch.no_grad()
    def sdedit(self, x0: torch.Tensor, cond: torch.Tensor, eta, *, seed: int, indices: Sequence[int],
               steps: int = 50, cfg_scale: float = 5.0, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None, **overrides) -> torch.Tensor:
        """SDEdit of ``x0`` from level ``eta`` (float or (B,)) on the scheduler's grid; fp32."""
        null = self.null_condition(cond) if null_cond is None else null_cond
        with _eval_mode(self):
            return self.sampler(sampler, **overrides).sdedit(x0.to(self._device()), cond, eta, seed=seed,
                                                             indices=indices, steps=steps, cfg_scale=cfg_scale,
                                                             stream=stream, null_cond=null)

    def _device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ----- files ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "DiffusersVideoAdapter":
        transformer = cls.transformer_class.from_pretrained(str(transformer_dir(path)), local_files_only=True)
        return cls(transformer, TextConditioner.load(path), **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.transformer.save_pretrained(str(path / "transformer"))
        if self.conditioner is not None:
            self.conditioner.save(path)

    def export_lora(self, path: str | os.PathLike) -> str:
        """The transformer's adapters as ``transformer.<module>.lora_{A,B}.weight`` + diffusers metadata,
        the file ``WanPipeline.load_lora_weights`` / ``CogVideoXPipeline.load_lora_weights`` reads."""
        return save_lora(self.transformer, os.fspath(path), prefix_style="diffusers")


class ParallelAdapterMixin:
    """What a parallelized diffusers adapter adds to its single-device class (listed first among its bases):
    ``local_frames`` (what the objectives ask a context-parallel model), samplers over whole clips under
    context parallel (``forward`` returns this rank's frames; sampling gathers them at every step, so every CP
    rank must sample the same inputs together), and refusal to ``save_pretrained`` shards. Its ``transformer``
    has ``spec`` (a ``ShardSpec``) and ``local_frames``."""

    def local_frames(self, frames: int) -> slice:
        return self.transformer.local_frames(frames)

    def whole_clip_forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return whole_clip(self(x, t, cond), self.transformer.spec)

    def sampler(self, name: Optional[str] = None, **overrides):
        sampler = super().sampler(name, **overrides)
        sampler.model_fn = lambda x, t, c: self.whole_clip_forward(x, t, c).float()
        return sampler

    def save_pretrained(self, path) -> None:
        single = next(c.__name__ for c in type(self).__mro__
                      if issubclass(c, DiffusersVideoAdapter) and not issubclass(c, ParallelAdapterMixin))
        raise NotImplementedError(f"a parallelized model holds shards: save the consolidated weights (the run's "
                                  f"model.safetensors) and load them into a {single}")


class FeedForwardProjection(nn.Module):
    """Holds a feed-forward's first projection under the name diffusers' GELU module gives it (``net.0.proj``),
    so a parallel feed-forward keeps diffusers' parameter names."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj


