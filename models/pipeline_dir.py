"""A diffusers pipeline directory AS RELEASED (Wan 2.1 / 2.2, CogVideoX 2B / 5B / 1.5), read and checked before
any work starts, and its parts loaded from it.

A release is a folder with ``model_index.json`` (the pipeline class and the class of each part) and one
subfolder per part::

    model_index.json      {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                           "transformer_2": [...] | [null, null], "boundary_ratio": 0.875 | null,
                           "expand_timesteps": false, "vae": [...], "text_encoder": [...], ...}
    transformer/          config.json + diffusion_pytorch_model*.safetensors (sharded for the 14B models)
    transformer_2/        Wan 2.2 A14B only: the low-noise expert
    vae/                  AutoencoderKLWan | AutoencoderKLCogVideoX
    text_encoder/         UMT5EncoderModel (Wan) | T5EncoderModel (CogVideoX)
    tokenizer/            the text encoder's tokenizer
    scheduler/            scheduler_config.json (UniPC / flow-match Euler for Wan, CogVideoX DDIM / DPM)

``PipelineDirectory.open(path, kind)`` reads ``model_index.json`` and checks, in this order, that the folder
exists, that it is a pipeline of the family ``kind`` ('wan' | 'cogvideox') and a text-to-video one, and that
the transformer(s) it lists are there (Wan 2.2's ``transformer_2`` with its ``boundary_ratio``). Parts that only
some callers need are checked by ``require(*parts)``: ``require("vae", "text_encoder", "tokenizer")`` before
encoding a dataset. Every failure is ONE ``ModelDirectoryError`` (a ValueError) naming the directory and the
missing part or the family found; the config layer turns it into a config error.

The loaders return vidpo's wrappers, in the caller's dtype on the caller's device, from local files only
(``vidpo.models.text_encoder.offline_hub``): ``vae() -> DiffusersVAE``, ``text_encoder() -> TextEncoder``,
``transformer(name)`` (the diffusers model; the family's adapter wraps it: ``vidpo.models.registry.load_adapter``),
``scheduler_config()`` / ``scheduler()``.

The legacy layout (a bare ``transformer/`` folder, or a transformer folder itself, and optionally
``text_conditioner.safetensors``: the toy tests' model directories) has no ``model_index.json``; the adapters
still load it (``DiffusersVideoAdapter.from_pretrained``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.models.text_encoder import TextEncoder, offline_hub
from vidpo.models.vae import DiffusersVAE

MODEL_INDEX = "model_index.json"
PARTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")
# The file that makes a part's folder usable (any one of them, for the tokenizer).
PART_FILES = {"transformer": ("config.json",), "transformer_2": ("config.json",), "vae": ("config.json",),
              "text_encoder": ("config.json",), "scheduler": ("scheduler_config.json",),
              "tokenizer": ("tokenizer_config.json", "tokenizer.json", "spiece.model", "tokenizer.model")}


class ModelDirectoryError(ValueError):
    """A model directory that cannot serve the request: missing, of another family, or missing a part."""


@dataclass(frozen=True)
class PipelineFacts:
    """What vidpo knows of a diffusers pipeline class: its family, whether it is text-to-video (the only kind the
    engine trains: an image-conditioned transformer needs image latents the engine does not have) and how the
    pipeline encodes prompts (``TextEncoder``'s ``masked``; its default ``max_sequence_length``)."""

    family: str
    text_to_video: bool
    masked_text: bool
    text_max_length: int


_WAN, _COG = dict(family="wan", masked_text=True, text_max_length=512), dict(family="cogvideox", masked_text=False,
                                                                             text_max_length=226)
KNOWN_PIPELINES: dict[str, PipelineFacts] = {
    "WanPipeline": PipelineFacts(text_to_video=True, **_WAN),
    "WanImageToVideoPipeline": PipelineFacts(text_to_video=False, **_WAN),
    "WanVideoToVideoPipeline": PipelineFacts(text_to_video=False, **_WAN),
    "WanVACEPipeline": PipelineFacts(text_to_video=False, **_WAN),
    "WanAnimatePipeline": PipelineFacts(text_to_video=False, **_WAN),
    "CogVideoXPipeline": PipelineFacts(text_to_video=True, **_COG),
    "CogVideoXImageToVideoPipeline": PipelineFacts(text_to_video=False, **_COG),
    "CogVideoXVideoToVideoPipeline": PipelineFacts(text_to_video=False, **_COG),
    "CogVideoXFunControlPipeline": PipelineFacts(text_to_video=False, **_COG),
}


def is_pipeline_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a ``model_index.json`` (a diffusers pipeline directory)."""
    return (Path(path) / MODEL_INDEX).is_file()


def _family_of(class_name: str) -> str:
    if class_name in KNOWN_PIPELINES:
        return KNOWN_PIPELINES[class_name].family
    for prefix, family in (("CogVideoX", "cogvideox"), ("Wan", "wan")):
        if class_name.startswith(prefix):
            return family
    return "unknown"


def _has_part(folder: Path, part: str) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in PART_FILES.get(part, ("config.json",)))


def _read_index(path: Path) -> dict:
    if not path.exists():
        raise ModelDirectoryError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelDirectoryError(f"model directory {path} is not a directory")
    index_path = path / MODEL_INDEX
    if not index_path.is_file():
        legacy = _has_part(path / "transformer", "transformer") or (path / "config.json").is_file()
        hint = (" (it holds a bare transformer: the legacy layout, loaded by the adapters' from_pretrained)"
                if legacy else ": expected a diffusers pipeline directory (model_index.json, transformer/, vae/, "
                               "text_encoder/, tokenizer/, scheduler/) or a transformer/ folder")
        raise ModelDirectoryError(f"model directory {path}: no {MODEL_INDEX}{hint}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirectoryError(f"{index_path}: unreadable ({exc})") from None
    if not isinstance(index, dict):
        raise ModelDirectoryError(f"{index_path}: expected a JSON object, got {type(index).__name__}")
    return index


def _listed_parts(index: dict) -> dict[str, tuple[str, str]]:
    """``{part: (library, class)}`` of the parts model_index.json lists (``[null, null]`` means absent)."""
    parts = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue
        library, cls = value
        if library is not None and cls is not None:
            parts[name] = (str(library), str(cls))
    return parts


@dataclass(frozen=True)
class PipelineDirectory:
    """A checked diffusers pipeline directory (module docstring); build it with ``PipelineDirectory.open``."""

    path: Path
    kind: str
    class_name: str
    parts: dict = field(default_factory=dict)          # {part: (library, class)} as listed in model_index.json
    boundary_ratio: Optional[float] = None             # Wan 2.2 A14B: the expert switch (fraction of timesteps)
    expand_timesteps: bool = False                     # Wan 2.2 TI2V-5B: per-token timesteps in the pipeline
    text_max_length: int = 512                         # tokens per prompt (the pipeline's max_sequence_length)
    masked_text: bool = True                           # TextEncoder's convention (see vidpo.models.text_encoder)

    @classmethod
    def open(cls, path: str | os.PathLike, kind: str, *, pipelines: Optional[Sequence[str]] = None,
             text_max_length: Optional[int] = None) -> "PipelineDirectory":
        """Read and check the pipeline directory ``path`` for the model family ``kind``.

        ``pipelines``: the pipeline classes the caller accepts (default: the text-to-video pipelines of ``kind``,
        see ``KNOWN_PIPELINES``); ``text_max_length``: tokens per prompt (default: the pipeline's own)."""
        path = Path(path)
        index = _read_index(path)
        name = str(index.get("_class_name") or "")
        family = _family_of(name)
        if pipelines is None:
            pipelines = tuple(n for n, f in KNOWN_PIPELINES.items() if f.family == kind and f.text_to_video)
        if family != kind:
            raise ModelDirectoryError(
                f"model directory {path} is a {name or 'nameless'} pipeline (family '{family}'), but the model kind "
                f"is '{kind}': point model.path at a {kind} release or set model.kind={family}"
                if family != "unknown" else
                f"model directory {path}: {MODEL_INDEX} names '{name}', not a pipeline of family '{kind}' "
                f"(expected one of {tuple(pipelines)})")
        if name not in pipelines:
            raise ModelDirectoryError(f"model directory {path} is a {name}: vidpo trains text-to-video "
                                      f"{kind} models ({', '.join(pipelines)})")
        parts = _listed_parts(index)
        boundary = index.get("boundary_ratio")
        facts = KNOWN_PIPELINES.get(name, PipelineFacts(kind, True, True, 512))
        pipe = cls(path=path, kind=kind, class_name=name, parts=parts,
                   boundary_ratio=None if boundary is None else float(boundary),
                   expand_timesteps=bool(index.get("expand_timesteps") or False),
                   text_max_length=int(text_max_length or facts.text_max_length), masked_text=facts.masked_text)
        experts = ("transformer", "transformer_2") if "transformer_2" in parts else ("transformer",)
        pipe.require(*experts)
        if pipe.boundary_ratio is not None and "transformer_2" not in parts:
            raise ModelDirectoryError(f"model directory {path}: {MODEL_INDEX} sets boundary_ratio="
                                      f"{pipe.boundary_ratio} but lists no transformer_2 (the low-noise expert)")
        if "transformer_2" in parts and pipe.boundary_ratio is None:
            raise ModelDirectoryError(f"model directory {path}: {MODEL_INDEX} lists transformer_2 but no "
                                      "boundary_ratio (where the two experts switch)")
        if pipe.boundary_ratio is not None and not 0.0 < pipe.boundary_ratio < 1.0:
            raise ModelDirectoryError(f"model directory {path}: boundary_ratio must be in (0, 1), got "
                                      f"{pipe.boundary_ratio}")
        return pipe

    # ----- parts ------------------------------------------------------------------------------------------
    def has(self, part: str) -> bool:
        """True when model_index.json lists ``part`` and its folder holds its config."""
        return part in self.parts and _has_part(self.path / part, part)

    def missing(self, *parts: str) -> list[str]:
        return [part for part in parts if not self.has(part)]

    def require(self, *parts: str) -> "PipelineDirectory":
        """``self`` when every part in ``parts`` is listed and present; else ONE ModelDirectoryError naming the
        directory and every missing part."""
        missing = self.missing(*parts)
        if missing:
            what = ", ".join(f"{part}/ ({self._why_missing(part)})" for part in missing)
            raise ModelDirectoryError(f"model directory {self.path} ({self.class_name}) is missing {what}")
        return self

    def _why_missing(self, part: str) -> str:
        if part not in self.parts:
            return f"not listed in {MODEL_INDEX}"
        if not (self.path / part).is_dir():
            return "no such folder"
        return "no " + " or ".join(PART_FILES.get(part, ("config.json",))) + " in it"

    @property
    def experts(self) -> tuple[str, ...]:
        """The transformer parts: ('transformer',) or, for Wan 2.2 A14B, ('transformer', 'transformer_2')."""
        return ("transformer", "transformer_2") if "transformer_2" in self.parts else ("transformer",)

    def config(self, part: str) -> dict:
        """The part's config.json (scheduler: scheduler_config.json) as a dict."""
        self.require(part)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        try:
            return json.loads((self.path / part / name).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelDirectoryError(f"{self.path / part / name}: unreadable ({exc})") from None

    def _diffusers_class(self, part: str):
        offline_hub()
        import diffusers

        library, name = self.parts[part]
        name = self.config(part).get("_class_name", name)
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ModelDirectoryError(f"model directory {self.path}: {part}/ is a '{name}', which diffusers "
                                      f"{diffusers.__version__} does not have")
        return cls

    # ----- loaders ----------------------------------------------------------------------------------------
    def transformer(self, part: str = "transformer", *, device: torch.device | str | None = None,
                    dtype: Optional[torch.dtype] = None):
        """The diffusers transformer ``part`` ('transformer' | 'transformer_2'), loaded in ``dtype`` (default:
        as stored) on ``device``."""
        if part not in ("transformer", "transformer_2"):
            raise ValueError(f"not a transformer part: {part!r}")
        self.require(part)
        cls = self._diffusers_class(part)
        model = cls.from_pretrained(str(self.path / part), torch_dtype=dtype, local_files_only=True)
        return model.to(device) if device is not None else model

    def vae(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *, tiling: bool = False,
            slicing: bool = False) -> DiffusersVAE:
        """The VAE (``vidpo.models.vae.DiffusersVAE``); ``tiling`` / ``slicing`` bound its decoder's memory."""
        self.require("vae")
        return DiffusersVAE(self.path / "vae", device, dtype, tiling=tiling, slicing=slicing)

    def text_encoder(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     max_length: Optional[int] = None) -> TextEncoder:
        """The text encoder with its tokenizer, in this pipeline's prompt convention; ``max_length`` tokens per
        prompt (default: the transformer's ``max_text_seq_length`` (CogVideoX), else ``text_max_length``).
        CogVideoX-2B's sincos position table covers exactly ``max_text_seq_length`` text tokens: another length is
        a ModelDirectoryError here rather than a shape error in the first forward."""
        self.require("text_encoder", "tokenizer")
        config = self.config("transformer")
        fixed = config.get("max_text_seq_length")
        if max_length is None:
            max_length = fixed or self.text_max_length
        elif fixed and not config.get("use_rotary_positional_embeddings") and int(max_length) != int(fixed):
            raise ModelDirectoryError(f"model directory {self.path}: its transformer's position embeddings take "
                                      f"exactly {fixed} text tokens (max_text_seq_length), not {max_length}")
        return TextEncoder(self.path / "text_encoder", self.path / "tokenizer", torch.device(device), dtype,
                           int(max_length), masked=self.masked_text)

    def scheduler_config(self) -> dict:
        """scheduler/scheduler_config.json (with its ``_class_name``)."""
        return self.config("scheduler")

    def scheduler(self):
        """A fresh diffusers scheduler from scheduler/."""
        return self._diffusers_class("scheduler").from_config(self.scheduler_config())
