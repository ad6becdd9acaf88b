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
  ``export_lora(path)``                   adapters in diffusers' format (``pipe.load_lora_weights(path)``);
  ``enable_gradient_checkpointing()``     the diffusers transformer's own activation checkpointing.

A model directory is either a diffusers pipeline directory as released (``model_index.json``, ``transformer/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``: ``vidpo.models.pipeline_dir``), whose transformer(s)
and scheduler the adapter takes, or the legacy layout: ``transformer/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``) and, optionally, ``text_conditioner.safetensors``; or a bare transformer
folder. ``from_pretrained`` loads both. Nothing is downloaded: every loader takes a local path.

LoRA export (``export_lora`` / ``export_lora_state`` / ``export_lora_file``), the layout diffusers'
``save_lora_weights`` writes and ``load_lora_weights`` reads::

    OUT/pytorch_lora_weights.safetensors                 transformer (Wan 2.2 A14B: the high-noise expert)
    OUT/transformer_2/pytorch_lora_weights.safetensors   Wan 2.2 A14B only: the low-noise expert

    pipe.load_lora_weights(OUT)                                            # WanPipeline / CogVideoXPipeline
    pipe.load_lora_weights(OUT / "transformer_2", load_into_transformer_2=True)    # Wan 2.2 A14B

Keys are ``transformer.<module>.lora_{A,B}.weight`` in BOTH files (diffusers strips the ``transformer.`` prefix
and loads the second file into ``pipe.transformer_2``); the safetensors metadata holds diffusers'
``lora_adapter_metadata`` (rank, alpha, dropout, per-module rank / alpha patterns, and the exact adapted module
names as ``target_modules``, so diffusers adapts exactly the exported modules, no more) and vidpo's own keys
(``rank``, ``alpha``, ``target_modules``: ``vidpo.models.lora.load_lora`` reads the file back). A path ending in
``.safetensors`` is the single-file form: ``OUT.safetensors`` (and ``OUT.transformer_2.safetensors``).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vidpo.models.dit.parallelize import whole_clip
from vidpo.models.lora import DIFFUSERS_METADATA_KEY, lora_modules, settings_from_metadata
from vidpo.models.pipeline_dir import MODEL_INDEX, ModelDirectoryError, PipelineDirectory, is_pipeline_dir
from vidpo.models.sampling import SamplerSpec, SchedulerSampler
from vidpo.models.text_encoder import offline_hub
from vidpo.utils import atomic

CONDITIONER_FILE = "text_conditioner.safetensors"
# diffusers' LORA_WEIGHT_NAME_SAFE: the file ``load_lora_weights(directory)`` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXPERTS = ("transformer", "transformer_2")
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
def eval_mode(model: nn.Module):
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
    if not p.is_dir():
        raise ModelDirectoryError(f"model directory {p} {'is not a directory' if p.exists() else 'does not exist'}")
    for candidate in (p / "transformer", p):
        if (candidate / "config.json").exists():
            return candidate
    raise ModelDirectoryError(f"model directory {p}: no {MODEL_INDEX} and no transformer/ (expected a diffusers "
                              "pipeline directory as released, or a transformer/ folder with config.json)")


class DiffusersVideoAdapter(nn.Module):
    """Shared part of the adapters: condition encoding, null condition, save / load, LoRA export, and the
    sampler hook (``sample`` / ``sdedit`` through ``vidpo.models.sampling.SchedulerSampler``).

    A subclass names its schedulers in ``SAMPLERS`` (the first is the default) and says how its scheduler's
    timesteps map to engine time: ``make_sampling_scheduler(name, **overrides)``, ``scheduler_model_time``,
    ``scheduler_level`` (see ``vidpo.models.sampling.SamplerSpec``). It also names its family (``family``, the
    ``model.kind``), its diffusers transformer class (``TRANSFORMER_CLASS``) and pipeline (``PIPELINE_CLASS``), and
    takes what a pipeline directory adds beyond the transformer in ``pipeline_kwargs``."""

    family: str = ""
    TRANSFORMER_CLASS: str = ""          # the diffusers class name of the transformer(s)
    PIPELINE_CLASS: str = ""             # the diffusers text-to-video pipeline of the family
    SAMPLERS: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module, conditioner: Optional[TextConditioner] = None, *,
                 sampler: Optional[str] = None):
        super().__init__()
        self.transformer = transformer
        self.conditioner = conditioner
        self.pipeline_source: Optional[str] = None   # the release directory's pipeline class, when loaded from one
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
        """The transformer's compute dtype: diffusers' ``ModelMixin.dtype`` skips the modules it keeps in float32
        (Wan's ``_keep_in_fp32_modules``: norms, time embedder, ``scale_shift_table``) in a bf16 model."""
        dtype = getattr(self.transformer, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.transformer.parameters()).dtype

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
        with eval_mode(self):
            return self.sampler(sampler, **overrides).sample(cond, shape, seed=seed, indices=indices, steps=steps,
                                                             cfg_scale=cfg_scale, stream=stream, null_cond=null,
                                                             device=self._device())

    @torch.no_grad()
    def sdedit(self, x0: torch.Tensor, cond: torch.Tensor, eta, *, seed: int, indices: Sequence[int],
               steps: int = 50, cfg_scale: float = 5.0, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None, sampler: Optional[str] = None, **overrides) -> torch.Tensor:
        """SDEdit of ``x0`` from level ``eta`` (float or (B,)) on the scheduler's grid; fp32."""
        null = self.null_condition(cond) if null_cond is None else null_cond
        with eval_mode(self):
            return self.sampler(sampler, **overrides).sdedit(x0.to(self._device()), cond, eta, seed=seed,
                                                             indices=indices, steps=steps, cfg_scale=cfg_scale,
                                                             stream=stream, null_cond=null)

    def _device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def experts(self) -> list[tuple[str, nn.Module]]:
        """``[(part name, transformer)]``: ``[("transformer", ...)]``, or both experts of a Wan 2.2 A14B."""
        return [(name, getattr(self, name)) for name in EXPERTS if getattr(self, name, None) is not None]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass (the diffusers transformer's own activation
        checkpointing, every expert): same gradients, activation memory of one block instead of all."""
        for name, expert in self.experts():
            if not callable(getattr(expert, "enable_gradient_checkpointing", None)):
                raise NotImplementedError(f"{type(expert).__name__} ({name}) has no enable_gradient_checkpointing: "
                                          "a parallelized model takes parallel.activation_checkpointing instead")
            expert.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for _, expert in self.experts():
            expert.disable_gradient_checkpointing()

    # ----- files ------------------------------------------------------------------------------------
    @classmethod
    def _diffusers_transformer_class(cls):
        offline_hub()
        import diffusers

        return getattr(diffusers, cls.TRANSFORMER_CLASS)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: torch.device | str | None = None,
                        dtype: Optional[torch.dtype] = None, **kwargs) -> "DiffusersVideoAdapter":
        """The adapter over the model directory ``path``, in ``dtype`` (default: as stored) on ``device``: a
        diffusers pipeline directory as released (``from_pipeline``) or the legacy layout (``transformer/`` +
        optional ``text_conditioner.safetensors``, or a bare transformer folder). ``kwargs`` go to the adapter
        (``sampler``; Wan also ``sample_shift``). A ModelDirectoryError (ValueError) names a directory that is
        neither, or holds another family's transformer."""
        if is_pipeline_dir(path):
            return cls.from_pipeline(PipelineDirectory.open(path, cls.family), device=device, dtype=dtype, **kwargs)
        folder = transformer_dir(path)
        found = json.loads((folder / "config.json").read_text()).get("_class_name")
        if found and found != cls.TRANSFORMER_CLASS:
            raise ModelDirectoryError(f"model directory {path}: {folder.name}/ holds a {found}, not a "
                                      f"{cls.TRANSFORMER_CLASS} (model kind '{cls.family}')")
        transformer = cls._diffusers_transformer_class().from_pretrained(str(folder), torch_dtype=dtype,
                                                                         local_files_only=True)
        conditioner = TextConditioner.load(path)
        model = cls(transformer, conditioner, **kwargs)
        return model.to(device) if device is not None else model

    @classmethod
    def from_pipeline(cls, pipe: PipelineDirectory, *, device: torch.device | str | None = None,
                      dtype: Optional[torch.dtype] = None, **kwargs) -> "DiffusersVideoAdapter":
        """The adapter over an opened pipeline directory: its transformer(s) in ``dtype`` on ``device``, what
        the family takes from the release (``pipeline_kwargs``: scheduler, Wan 2.2's second expert), and a
        ``text_conditioner.safetensors`` beside them if there is one. ``kwargs`` override."""
        for part in pipe.experts:
            found = pipe.parts[part][1]
            if found != cls.TRANSFORMER_CLASS:
                raise ModelDirectoryError(f"model directory {pipe.path}: {part}/ is a {found}, not a "
                                          f"{cls.TRANSFORMER_CLASS}")
        transformer = pipe.transformer("transformer", device=device, dtype=dtype)
        conditioner = TextConditioner.load(pipe.path)
        if conditioner is not None and device is not None:
            conditioner = conditioner.to(device)
        model = cls(transformer, conditioner, **{**cls.pipeline_kwargs(pipe, device=device, dtype=dtype), **kwargs})
        model.pipeline_source = pipe.class_name
        return model

    @classmethod
    def pipeline_kwargs(cls, pipe: PipelineDirectory, *, device=None, dtype=None) -> dict:
        """Constructor arguments a release adds beyond its transformer (overridden per family)."""
        return {}

    def index_entries(self) -> dict:
        """Extra model_index.json entries ``save_pretrained`` writes (Wan 2.2: ``boundary_ratio``)."""
        return {}

    def scheduler_config(self) -> Optional[dict]:
        """The release's scheduler config that ``save_pretrained`` keeps (None: nothing to keep)."""
        return None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``transformer/`` (and ``transformer_2/``) + ``text_conditioner.safetensors`` when there is one. An
        adapter loaded from a release, or one with two experts, also writes ``scheduler/`` and a
        ``model_index.json`` listing what is there (a partial pipeline directory, loadable with
        ``from_pretrained``); the others write the legacy layout."""
        path = Path(path)
        parts = {}
        for name, expert in self.experts():
            expert.save_pretrained(str(path / name))
            parts[name] = ["diffusers", type(expert).__name__]
        if self.conditioner is not None:
            self.conditioner.save(path)
        scheduler = self.scheduler_config()
        if self.pipeline_source is None and len(parts) == 1:
            return
        import diffusers

        index = {"_class_name": self.pipeline_source or self.PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                 **parts, **self.index_entries()}
        if scheduler is not None:
            atomic.write_json(path / "scheduler" / "scheduler_config.json", scheduler)
            index["scheduler"] = ["diffusers", scheduler.get("_class_name")]
        atomic.write_json(path / MODEL_INDEX, index)

    def export_lora(self, path: str | os.PathLike) -> str:
        """Write the adapters in diffusers' format (module docstring: the layout): a directory ``path`` (diffusers'
        ``save_lora_weights`` layout), or the single-file form when ``path`` ends in ``.safetensors``. Returns
        ``path``, what ``pipe.load_lora_weights`` takes."""
        written = 0
        for name, expert in self.experts():
            modules = list(lora_modules(expert))
            if not modules:
                continue
            tensors = {}
            for module_name, m in modules:
                tensors[f"{module_name}.lora_A.weight"] = m.lora_A.weight
                tensors[f"{module_name}.lora_B.weight"] = m.lora_B.weight
            dropout = max((m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0) for _, m in modules)
            write_diffusers_lora(tensors, lora_export_paths(path)[name],
                                 alphas={module_name: m.alpha for module_name, m in modules}, dropout=dropout)
            written += 1
        if not written:
            raise ValueError("export_lora: the model has no LoRA adapters (apply_lora first)")
        return os.fspath(path)


# ----- LoRA export in diffusers' format ---------------------------------------------------------------------
def lora_export_paths(path: str | os.PathLike) -> dict[str, Path]:
    """Where each expert's adapters go (module docstring): ``{"transformer": ..., "transformer_2": ...}``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return {"transformer": path, "transformer_2": path.with_name(f"{path.stem}.transformer_2.safetensors")}
    return {"transformer": path / LORA_WEIGHT_NAME, "transformer_2": path / "transformer_2" / LORA_WEIGHT_NAME}


def split_lora_key(key: str) -> tuple[str, str]:
    """``(expert, '<module>.lora_{A,B}.weight')`` of an adapter key with any of the prefixes vidpo writes or
    reads: peft's ``base_model.model.``, diffusers' ``transformer.``, the adapter's own ``transformer.`` /
    ``transformer_2.`` (a multi-process run's checkpoint: ``base_model.model.transformer_2.blocks...``) or none;
    peft's adapter-name infix (``lora_A.default.weight``) is dropped."""
    key = key.removeprefix("base_model.model.").removeprefix("transformer.")
    expert = "transformer"
    if key.startswith("transformer_2."):
        expert, key = "transformer_2", key[len("transformer_2."):]
    else:
        key = key.removeprefix("transformer.")
    for factor in ("lora_A", "lora_B"):
        head, sep, tail = key.partition(f".{factor}.")
        if sep and tail != "weight" and tail.endswith(".weight"):
            key = f"{head}.{factor}.weight"
    return expert, key


def write_diffusers_lora(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                         alpha: Optional[float] = None, alphas: Optional[Mapping[str, float]] = None,
                         dropout: float = 0.0) -> Path:
    """One transformer's adapters, keyed ``<module>.lora_{A,B}.weight`` relative to the transformer, as the file
    diffusers loads (``transformer.``-prefixed keys, ``lora_adapter_metadata``), atomically. ``alphas``: per
    module (the most common one is ``lora_alpha``, the others go in ``alpha_pattern``), else ``alpha`` for all."""
    modules = sorted({key.rpartition(".lora_")[0] for key in tensors})
    for module in modules:
        for factor in ("lora_A", "lora_B"):
            if f"{module}.{factor}.weight" not in tensors:
                raise ValueError(f"LoRA export: '{module}' has no {factor} factor")
    unexpected = sorted(k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if not modules or unexpected:
        raise ValueError(f"LoRA export: expected '<module>.lora_A.weight' / '.lora_B.weight' keys, got "
                         f"{unexpected[:3] or 'none'}")
    ranks = {m: int(tensors[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    if alphas is None:
        if alpha is None:
            raise ValueError("LoRA export: give alpha or alphas")
        alphas = {m: float(alpha) for m in modules}
    alphas = {m: float(alphas[m]) for m in modules}
    top_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": rank, "lora_alpha": top_alpha, "lora_dropout": float(dropout), "target_modules": modules,
              "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
              "alpha_pattern": {m: a for m, a in alphas.items() if a != top_alpha}}
    metadata = {"format": "pt", "prefix_style": "diffusers", "rank": str(rank), "alpha": repr(top_alpha),
                "dropout": repr(float(dropout)), "target_modules": json.dumps(modules),
                DIFFUSERS_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)}
    out = {f"transformer.{k}": v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic.save_safetensors(out, path, metadata=metadata)
    return Path(path)


def export_lora_state(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *, alpha: float,
                      dropout: float = 0.0) -> str:
    """Adapter tensors keyed with any prefix (``split_lora_key``: a single-process ``lora_state_dict``, a
    multi-process run's ``base_model.model.transformer.*`` checkpoint, either expert) in the export layout at
    ``path`` (a directory, or the single-file form). Returns ``path``."""
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        expert, module_key = split_lora_key(key)
        experts.setdefault(expert, {})[module_key] = value
    if not experts:
        raise ValueError("LoRA export: no adapter tensors")
    targets = lora_export_paths(path)
    for expert, state in experts.items():
        write_diffusers_lora(state, targets[expert], alpha=alpha, dropout=dropout)
    return os.fspath(path)


def export_lora_file(source: str | os.PathLike, path: str | os.PathLike) -> str:
    """Re-export a LoRA file vidpo wrote (a run's ``lora.safetensors`` or a checkpoint's, single- or
    multi-process; its metadata gives alpha) in the diffusers layout at ``path``. Returns ``path``."""
    source = os.fspath(source)
    with safe_open(source, framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    settings = settings_from_metadata(metadata, source)
    return export_lora_state(tensors, path, alpha=settings["alpha"], dropout=settings.get("dropout", 0.0))


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


