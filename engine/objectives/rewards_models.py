"""Reward models the user points at (``reward.models``): local transformers checkpoints with a declared scoring
rule, as differentiable rewards of ``vidpo.objectives.rewards.RewardMixture`` on a release's decoded videos.

A recipe names each model once and weights it under ``reward.image`` / ``reward.video``::

    reward:
      models:
        clip_frames: {path: /models/clip-vit-h-14, kind: image, rule: clip_cosine}          # HPSv2.1 / CLIP
        clip_video:  {path: /models/clip-vit-h-14, kind: video, rule: clip_mean_cosine}     # a video-text model
      image: {clip_frames: 1.0}
      video: {clip_video: 0.5}
      subset: web                      # routed to a data subset (prompt file "source"), as the paper does

Scoring rules (``x`` pixels in [-1, 1], ``c`` the row's prompt text; ``E_img`` / ``E_txt`` the model's projected
image / text features, ``u^ = u / |u|``):

* ``clip_cosine`` (image-text, per frame)::

      R_img(x, c) = < E_img(P(x))^,  E_txt(c)^ >                   cosine similarity, in [-1, 1]

* ``clip_mean_cosine`` (video-text): the clip's frames pooled in feature space, then compared with the text::

      R_vid(x, c) = < ( mean_m E_img(P(x[:, :, m]))^ )^,  E_txt(c)^ >

``P`` is CLIP's preprocessing written differentiably: ``(x + 1) / 2``, bilinear resize to the model's
``image_size`` (anti-aliasing off), normalisation with the checkpoint's ``image_mean`` / ``image_std``
(``preprocessor_config.json``; OpenAI CLIP's when absent). The text features are computed once per prompt
(no gradient flows to them); the reward model is frozen and gets no gradient itself; the gradient w.r.t.
``x`` trains the student. HPSv2 is an OpenCLIP ViT-H/14 fine-tune: exported to a transformers ``CLIPModel``
it plugs in with ``clip_cosine``.

A served judge (``rule: served_score``: a VLM over HTTP, ``vidpo.objectives.rewards_served``) is the other kind of
entry: its score has no gradient, so it is not a term of this differentiable mixture. It scores each routed
training clip once, pointwise, while the data are preprocessed, and weights the CD loss of the routed rows::

    w(r) = exp( sum_j gamma_j z_j(r) ) / mean_{r' in R} exp( sum_j gamma_j z_j(r') )     r in R (reward.subset)
    w(r) = 1                                                                             otherwise

with ``z_j`` judge ``j``'s score standardised over the routed rows (0 for a clip it could not score) and
``gamma_j`` its weight under ``reward.image`` / ``reward.video``. ``build_model_rewards`` skips such entries;
both kinds can be mixed in one recipe.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from vidpo.config.distill import MODEL_RULES, SERVED_RULE
from vidpo.objectives.rewards import REWARDS, RewardMixture, RewardTerm

RULES = MODEL_RULES
"""Scoring rule -> the kind of reward it defines (a local model's; ``served_score`` is not a differentiable rule)."""
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is projected; 4.x returned the tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipReward:
    """A CLIP-style reward (module doc) over prompts ``texts``; called as ``reward(pixels, prompt_index)``."""

    def __init__(self, name: str, path: str | Path, rule: str, texts: Sequence[str], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, model=None):
        """``model``: the checkpoint's CLIPModel already loaded (on ``device``, in ``dtype``), shared by rewards
        that score with the same checkpoint under different rules."""
        from transformers import AutoTokenizer, CLIPModel

        if rule not in RULES:
            raise ValueError(f"reward model {name!r}: unknown rule {rule!r}; known: {sorted(RULES)}")
        path = Path(path)
        self.name, self.rule, self.kind, self.path = name, rule, RULES[rule], path
        if model is None:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype)
            model.eval().requires_grad_(False)
        self.model = model
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.no_grad():
            self.text = F.normalize(_features(self.model.get_text_features(**tokens)).to(dtype), dim=-1)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        config = path / "preprocessor_config.json"
        if config.is_file():
            pre = json.loads(config.read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit image features of frames ``(N, 3, H, W)`` in [-1, 1] (differentiable)."""
        x = (frames.to(self.mean.dtype) + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - self.mean) / self.std
        return F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1)

    def __call__(self, pixels: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        text = self.text[prompt_index.to(self.text.device).long()]
        if self.kind == "image":
            return (self.image_features(pixels) * text).sum(-1)
        batch, channels, frames, height, width = pixels.shape
        flat = pixels.transpose(1, 2).reshape(batch * frames, channels, height, width)
        pooled = F.normalize(self.image_features(flat).view(batch, frames, -1).mean(1), dim=-1)
        return (pooled * text).sum(-1)


def build_model_rewards(reward_cfg, texts: Sequence[str], *, decode: Optional[Callable] = None,
                        device: torch.device | str = "cpu") -> RewardMixture:
    """The mixture of ``reward.image`` / ``reward.video`` over the models of ``reward.models`` for prompts ``texts``
    (a row's prompt index picks its text); ``decode`` maps the student's latents to pixels (the release's VAE).
    Served judges (``rule: served_score``) are not differentiable terms: skipped here (module doc)."""
    terms, loaded = [], {}
    for kind, table in (("image", reward_cfg.image), ("video", reward_cfg.video)):
        for name, weight in (table or {}).items():
            spec = (reward_cfg.models or {}).get(name)
            if isinstance(spec, dict) and spec.get("rule") == SERVED_RULE:
                continue
            if spec is None:
                known = sorted(reward_cfg.models or {})
                hint = " (the shapes world's rewards score its own clips only)" if name in REWARDS else ""
                raise ValueError(f"reward.{kind}: {name!r} is not one of reward.models {known}{hint}")
            if spec["kind"] != kind:
                raise ValueError(f"reward.{kind}: {name!r} is a {spec['kind']}-text reward "
                                 f"(reward.models.{name}.kind); list it under reward.{spec['kind']}")
            if name not in loaded:
                # two names on one checkpoint (a frame reward and a video reward) share its weights
                same = next((r for r in loaded.values() if Path(r.path) == Path(spec["path"])), None)
                loaded[name] = ClipReward(name, spec["path"], spec["rule"], texts, device=device,
                                          model=same.model if same is not None else None)
            terms.append(RewardTerm(loaded[name], float(weight)))
    return RewardMixture(terms, image_frames=reward_cfg.image_frames, decode=decode)


def model_reward_names(reward_cfg) -> list[str]:
    """The names under ``reward.image`` / ``reward.video`` that are differentiable rewards (not served judges)."""
    models = reward_cfg.models or {}
    return [name for table in (reward_cfg.image, reward_cfg.video) for name in (table or {})
            if not (isinstance(models.get(name), dict) and models[name].get("rule") == SERVED_RULE)]
