"""The VLM critic: a local vision-language model with a scoring head, scoring (video, prompt) per segment.

``VLMCritic(settings).score(clips, captions, segment_ids) -> CriticScores`` (the ``vidpo.models.critic.Critic``
interface):

  frames       each segment s of each video contributes ``frames_per_segment`` frames, evenly spaced over the
               segment (first to last frame; a segment shorter than that repeats frames)
  prompt       one chat turn per (video, segment): those frames as images, then ``instruction`` with the caption
               filled in (``{caption}``), through the processor's own chat template and the generation prompt
  backbone     ``AutoModelForImageTextToText`` from ``settings.backbone`` (a local transformers directory: LLaVA,
               Qwen2-VL, ...), frozen; LoRA adapters (``vidpo.models.lora.apply_lora``) on the linear layers
               named by ``lora_targets`` (in the vision tower as well as the language model when both name them)
  pool         the last hidden layer at the last non-padding token (``pooling: last``: with the generation prompt
               that token is where the model would start its verdict) or its mean over the non-padding tokens
               (``mean``)
  head         Dropout -> Linear(hidden, 1): the segment score             -> segments (n, S)
  frames       each frame gets its segment's score                          -> frames (n, F)
  video        the mean of the frame scores (= the frame-count-weighted mean of the segment scores, as the toy
               critic's)                                                    -> video (n,)

Scores are Bradley-Terry-with-ties logits (``vidpo.ipo.critic``); ``log_tie`` is the Davidson tie parameter.
Monte-Carlo dropout (``set_dropout``) acts on the head's dropout and the adapters' (``lora_dropout``); the
backbone itself always runs in eval mode. What trains: the head, ``log_tie`` and the LoRA factors; ``save`` writes
exactly those, with the settings (the backbone's resolved path included) as JSON in the safetensors metadata, in
one atomic file; ``load_vlm_critic`` rebuilds the critic from it and the backbone directory.

transformers is imported when a critic is built (an optional package).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vidpo.models.critic.model import Critic, CriticScores
from vidpo.models.lora import LoRALinear, apply_lora, mark_only_lora_trainable

VLM_FORMAT = "vidpo-vlm-critic-1"
DEFAULT_INSTRUCTION = ("These are frames of one segment of a video made for the caption: \"{caption}\". How well do "
                       "they follow the caption, and how good is their visual quality?")
POOLINGS = ("last", "mean")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class VLMCriticSettings:
    """What builds a VLM critic (the ``critic`` section's VLM fields, ``vidpo.config.CriticConfig``)."""

    backbone: str
    """A local transformers image-text-to-text directory (config, weights, processor with a chat template)."""
    frames_per_segment: int = 2
    pooling: str = "last"
    instruction: str = DEFAULT_INSTRUCTION
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_targets: Sequence[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.1
    """Dropout before the head."""
    dtype: str = "float32"
    """The backbone's dtype (the head and log_tie stay float32)."""

    def check(self) -> "VLMCriticSettings":
        if self.frames_per_segment < 1:
            raise ValueError(f"frames_per_segment must be >= 1, got {self.frames_per_segment}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if "{caption}" not in self.instruction:
            raise ValueError(f"instruction must contain '{{caption}}', got {self.instruction!r}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"dropout and lora_dropout must be in [0, 1), got {self.dropout}, {self.lora_dropout}")
        return self


def segment_frame_picks(segment_ids: torch.Tensor, k: int) -> torch.Tensor:
    """(S, k) pixel-frame indices: k frames evenly spaced over each segment, its first and last included."""
    ids = segment_ids.to(torch.long).cpu()
    picks = []
    for s in range(int(ids.max()) + 1):
        frames = torch.nonzero(ids == s).flatten()
        position = torch.linspace(0, len(frames) - 1, k).round().long() if k > 1 else torch.tensor([len(frames) // 2])
        picks.append(frames[position])
    return torch.stack(picks)


def _uint8(clips: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (or uint8) -> uint8 ``round((x + 1) * 127.5)`` (vidpo's pixel convention)."""
    if clips.dtype == torch.uint8:
        return clips
    return ((clips.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class VLMCritic(Critic):
    """A segment-level video critic on a vision-language backbone (module docstring)."""

    kind = "vlm"

    def __init__(self, settings: VLMCriticSettings, tie_init: float = -2.0):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.settings = settings.check()
        path = Path(settings.backbone)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"critic.backbone: no transformers model at {path} (expected config.json, the "
                                    "weights and the processor of an image-text-to-text model)")
        self.processor = AutoProcessor.from_pretrained(str(path))
        if getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"critic.backbone {path}: its processor has no image processor (not a vision-language "
                             "model)")
        self.backbone = AutoModelForImageTextToText.from_pretrained(str(path), dtype=DTYPES[settings.dtype])
        self.backbone.requires_grad_(False)
        self.adapted = apply_lora(self.backbone, rank=settings.lora_rank, alpha=settings.lora_alpha,
                                  dropout=settings.lora_dropout, target_modules=list(settings.lora_targets))
        mark_only_lora_trainable(self.backbone)
        self.backbone.eval()
        hidden = self.backbone.config.get_text_config().hidden_size
        self.head = nn.Sequential(nn.Dropout(settings.dropout), nn.Linear(hidden, 1))
        self.log_tie = nn.Parameter(torch.tensor(float(tie_init)))
        self._texts: dict[str, str] = {}

    # ----- modes ------------------------------------------------------------------------------------------
    def _dropouts(self) -> list[nn.Module]:
        """The head's dropout and the adapters' (the Monte-Carlo dropout of the votes)."""
        out = [m for m in self.head.modules() if isinstance(m, nn.Dropout)]
        out += [m.lora_dropout for m in self.backbone.modules()
                if isinstance(m, LoRALinear) and isinstance(m.lora_dropout, nn.Dropout)]
        return out

    def train(self, mode: bool = True) -> "VLMCritic":
        super().train(mode)
        self.backbone.eval()              # the backbone's own dropout / norm statistics never train
        for module in self._dropouts():
            module.train(mode)
        return self

    def set_dropout(self, active: bool) -> None:
        for module in self._dropouts():
            module.train(active)

    @property
    def device(self) -> torch.device:
        return self.head[1].weight.device

    # ----- scoring ------------------------------------------------------------------------------------------
    def prompt_text(self, caption: str) -> str:
        """The chat text of one (segment, caption): the processor's template over ``frames_per_segment`` images
        and the instruction, with the generation prompt."""
        if caption not in self._texts:
            k, text = self.settings.frames_per_segment, self.settings.instruction.replace("{caption}", caption)
            if getattr(self.processor, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}] * k + [{"type": "text", "text": text}]}]
                rendered = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:
                token = getattr(self.processor, "image_token", None) or "<image>"
                rendered = token * k + "\n" + text
            self._texts[caption] = rendered
        return self._texts[caption]

    def encode(self, clips: torch.Tensor, captions: Sequence[str], segment_ids: torch.Tensor) -> dict:
        """The processor's inputs for every (video, segment), video-major: n * S sequences."""
        pixels = _uint8(clips).cpu()
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"VLM critic expects clips (n, 3, F, H, W), got {tuple(pixels.shape)}")
        if len(captions) != pixels.shape[0]:
            raise ValueError(f"{len(captions)} captions for {pixels.shape[0]} clips")
        if segment_ids.numel() != pixels.shape[2]:
            raise ValueError(f"segment_ids has {segment_ids.numel()} entries for {pixels.shape[2]} frames")
        picks = segment_frame_picks(segment_ids, self.settings.frames_per_segment)      # (S, k)
        frames = pixels[:, :, picks.flatten()].permute(0, 2, 3, 4, 1).numpy()           # (n, S*k, H, W, 3)
        images = [np.ascontiguousarray(frame) for video in frames for frame in video]
        texts = [self.prompt_text(c) for c in captions for _ in range(picks.shape[0])]
        return self.processor(text=texts, images=images, return_tensors="pt", padding=True)

    def pooled(self, inputs: dict) -> torch.Tensor:
        """(m, hidden) float32: the pooled last hidden layer of each sequence."""
        device, dtype = self.device, DTYPES[self.settings.dtype]
        inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        inner = getattr(self.backbone, "model", None)
        if inner is not None and hasattr(inner, "language_model"):
            hidden = inner(**inputs).last_hidden_state
        else:
            hidden = self.backbone(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = inputs["attention_mask"]
        if self.settings.pooling == "last":
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp_min(1)).float()

    def score(self, clips: torch.Tensor, captions: Sequence[str], segment_ids: torch.Tensor) -> CriticScores:
        n = clips.shape[0]
        ids = segment_ids.to(torch.long).cpu()
        segments = self.head(self.pooled(self.encode(clips, captions, ids))).view(n, -1)        # (n, S)
        frames = segments[:, ids.to(segments.device)]                                          # (n, F)
        return CriticScores(frames=frames, segments=segments, video=frames.mean(1))

    # ----- files ----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What ``save`` writes: the head, log_tie and the LoRA factors."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith("head.") or k == "log_tie" or ".lora_A." in k or ".lora_B." in k}

    def metadata(self) -> dict:
        settings = dataclasses.asdict(self.settings)
        settings["backbone"] = str(Path(settings["backbone"]).resolve())
        settings["lora_targets"] = list(settings["lora_targets"])
        return {"format": VLM_FORMAT, "settings": json.dumps(settings)}

    def save(self, path, extra: Optional[dict] = None) -> None:
        """The trainable weights + the settings (JSON metadata), atomically (``path``.tmp-PID, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}, str(tmp),
                  metadata=meta)
        os.replace(tmp, path)


def read_vlm_settings(path, backbone: Optional[str] = None) -> VLMCriticSettings:
    """The settings saved in a VLM critic file; ``backbone`` replaces the saved backbone path (a moved model)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != VLM_FORMAT:
        raise ValueError(f"{path}: not a VLM critic file (metadata format {meta.get('format')!r})")
    fields = json.loads(meta["settings"])
    if backbone is not None:
        fields["backbone"] = str(backbone)
    return VLMCriticSettings(**fields)


def load_vlm_critic(path, device: torch.device | str = "cpu", *, backbone: Optional[str] = None) -> VLMCritic:
    """Rebuild a VLM critic saved by ``VLMCritic.save``: its backbone from the saved path (or ``backbone``), the
    head, log_tie and adapters from the file; in eval mode on ``device``."""
    critic = VLMCritic(read_vlm_settings(path, backbone))
    state = load_file(str(path))
    expected = critic.trainable_state()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit the critic of its settings: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    critic.load_state_dict(state, strict=False)
    return critic.to(device).eval()
