"""``vidpo launch --check``: what would stop the job, found before any allocation, all at once.

Each problem is one line naming the recipe key:

* the recipe itself (the loader's problems: unknown keys, values, its own layout rules);
* every path the job reads exists and can be read, unless an earlier stage of the same job writes it:
  ``model.path``, ``prompts.path``, ``train.init_from``, ``label.human_file``, ``critic.checkpoint`` /
  ``critic.backbone``, ``cache.manifest`` / ``vae`` / ``text_encoder`` / ``tokenizer``, ``data.shards``,
  ``distill.teacher`` / ``distill.data``, ``pref.pairs`` (with its ``manifest.jsonl``), and the output folder
  can be written;
* the model directory is a release of ``model.kind`` with the parts the stages load (``vidpo.models.registry``);
* the VLM endpoint answers (``label.labeler: vlm``, or a judged evaluation by the VLM): the labeller's own probe,
  ``GET {base_url}/models`` with the API key when the recipe names one, once, within a few seconds;
* the layout divides the world size (``cluster.nodes * cluster.gpus_per_node``), the model's heads and latent
  frames, and the global batch; tensor parallel stays inside a node.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence

from vidpo.cluster.job import ALL, Step
from vidpo.config import RunConfig, resolve_path
from vidpo.labeling import LabelingError, ServerUnreachable, VLMLabeler
from vidpo.models.pipeline_dir import ModelDirectoryError
from vidpo.models.registry import model_spec, open_pipeline
from vidpo.stages.parts import latent_frames_of

ENDPOINT_TIMEOUT_S = 5.0
USES_MODEL = ("cache", "generate", "train", "eval", "run", "iterate")
USES_JUDGE = ("label", "run", "iterate")
USES_EVAL_JUDGE = ("eval", "run", "iterate")


def _model_heads_frames(cfg: RunConfig) -> tuple[Optional[int], Optional[int]]:
    """The model's attention heads and latent frames after temporal patching, when the recipe (or its model
    directory) tells them; None for what it does not."""
    if model_spec(cfg.model.kind).adapter is None:
        try:
            dit = cfg.model.dit()
        except (ValueError, TypeError):
            return None, None
        return dit.num_heads, cfg.world.frames // dit.patch_size[0]
    try:
        pipe = open_pipeline(cfg.model.kind, resolve_path(cfg.model.path))
        config = pipe.config("transformer")
        heads = config.get("num_attention_heads")
        patch = config.get("patch_size_t") or (config.get("patch_size") if isinstance(config.get("patch_size"), list)
                                               else None)
        patch_t = patch[0] if isinstance(patch, list) else (patch or 1)
        frames = latent_frames_of(cfg)
        return heads, frames // patch_t if frames is not None else None
    except (ModelDirectoryError, OSError, ValueError, TypeError, KeyError):
        return None, None   # the model directory's own problem is reported by its path check


def trains_on_every_gpu(steps: Sequence[Step]) -> bool:
    """Whether a step runs the model on every GPU (torchrun): only then must the layout fit the world."""
    return any(s.ranks == ALL and s.stage in ("train", "eval", "run") for s in steps)


def layout_problems(cfg: RunConfig, world: int) -> list[str]:
    """What keeps the recipe's layout from running on ``world`` ranks (ParallelConfig.layout_problems with the
    model's heads and frames and the global batch), and tensor parallel across nodes."""
    heads, frames = _model_heads_frames(cfg)
    par, cl = cfg.parallel, cfg.cluster
    problems = [str(p) for p in par.layout_problems(
        world, num_heads=heads, frames=frames, batch=cfg.train.batch_size,
        world_from=f"cluster.nodes {cl.nodes} * cluster.gpus_per_node {cl.gpus_per_node}")]
    if par.tp > cl.gpus_per_node:
        problems.append(f"parallel.tp={par.tp} spans nodes (cluster.gpus_per_node={cl.gpus_per_node}): keep tensor "
                        "parallel inside a node's NVLink domain")
    return problems


def _readable(key: str, value: Optional[str], *, need: str = "any", inside: Sequence[str] = ()) -> list[str]:
    """Problems of the path ``value`` of recipe key ``key``: missing, unreadable, not a file / folder, or
    missing a file it must hold (``inside``)."""
    if not value:
        return []
    path = resolve_path(value)
    if not path.exists():
        return [f"{key}: {value} does not exist"]
    if need == "dir" and not path.is_dir():
        return [f"{key}: {value} is not a directory"]
    if need == "file" and not path.is_file():
        return [f"{key}: {value} is not a file"]
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return [f"{key}: {value} is not readable (permission denied)"]
    missing = [name for name in inside if not (path / name).exists()]
    if missing:
        return [f"{key}: {value} has no {' or '.join(missing)}"]
    return []


def _writable(out: str) -> list[str]:
    path = Path(out).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if probe == path and not path.is_dir():
        return [f"--out: {out} is a file, not a folder"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"--out: {out} cannot be written ({probe} is not writable)"]
    return []


def _model_dir(cfg: RunConfig) -> list[str]:
    if model_spec(cfg.model.kind).adapter is None:
        return _readable("train.init_from", cfg.train.init_from)
    if not cfg.model.path:
        return [f"model.path: model.kind={cfg.model.kind} loads from a model directory; set model.path"]
    problems = _readable("model.path", cfg.model.path, need="dir")
    if problems:
        return problems
    parts = ("vae", "text_encoder", "tokenizer") if cfg.prompts.path else ()
    try:
        open_pipeline(cfg.model.kind, resolve_path(cfg.model.path), require=parts)
    except ModelDirectoryError as exc:
        return [f"model.path: {exc}"]
    return _readable("train.init_from", cfg.train.init_from)


def endpoint_problems(vlm, timeout: float = ENDPOINT_TIMEOUT_S) -> list[str]:
    """Whether something answers at the VLM server ``vlm`` (a VLMConfig) names: the labeller's own probe
    (``VLMLabeler.probe``, ``GET {base_url}/models``), tried once with a short timeout."""
    try:
        VLMLabeler(dataclasses.replace(vlm, timeout_s=timeout, max_retries=0)).probe()
    except (ServerUnreachable, LabelingError) as exc:
        return [f"label.vlm.base_url: {exc}"]
    return []


def preflight(cfg: RunConfig, steps: Sequence[Step], out: str, *, recipe_problems: Sequence[str] = (),
              check_layout: bool = True, timeout: float = ENDPOINT_TIMEOUT_S) -> list[str]:
    """Every problem that would stop ``steps`` of ``cfg`` into ``out`` (module docstring), one line each;
    ``recipe_problems`` (the loader's) come first. ``check_layout`` False: the loader's problems already hold
    the layout's (``cfg`` is then the recipe loaded on one process)."""
    stages = [s.stage for s in steps]
    produced = {key for s in steps for key in s.produces}
    found: list[str] = []
    if any(s in USES_MODEL for s in stages):
        found += _model_dir(cfg)
        found += _readable("prompts.path", cfg.prompts.path, need="file")
    labeler = cfg.label.labeler
    if any(s in USES_JUDGE for s in stages):
        if labeler == "human":
            found += _readable("label.human_file", cfg.label.human_file, need="file")
        if labeler == "critic" or cfg.critic.backbone:
            found += _readable("critic.checkpoint", cfg.critic.checkpoint)
            found += _readable("critic.backbone", cfg.critic.backbone, need="dir")
    judge = cfg.eval.judge if cfg.eval.judge not in ("label", "auto") else labeler
    if (labeler == "vlm" and any(s in USES_JUDGE for s in stages)) or \
            (judge == "vlm" and any(s in USES_EVAL_JUDGE for s in stages) and cfg.prompts.path):
        found += endpoint_problems(cfg.label.vlm, timeout)
    if "cache" in stages:
        found += _readable("cache.manifest", cfg.cache.manifest)
        for key in ("vae", "text_encoder", "tokenizer"):
            found += _readable(f"cache.{key}", getattr(cfg.cache, key), need="dir")
    if "train" in stages:
        if cfg.data.source == "latents" and "data.shards" not in produced:
            found += _readable("data.shards", cfg.data.shards, need="dir") if cfg.data.shards else \
                ["data.shards: data.source=latents needs the `vidpo cache` folder (or a cache.manifest to make it)"]
        if cfg.train.objective == "consistency_distill":
            found += _readable("distill.teacher", cfg.distill.teacher)
            found += _readable("distill.data", cfg.distill.data, need="dir")
        if cfg.train.objective in ("flow_dpo", "dense_dpo", "kto") and "pref.pairs" not in produced:
            found += _readable("pref.pairs", cfg.pref.pairs, need="dir", inside=("manifest.jsonl",)) \
                if cfg.pref.pairs else ["pref.pairs: training alone needs a labelled pairs folder (or launch "
                                        "the whole job, which makes it)"]
    if "label" in stages and "generated" not in produced:
        for argv in next(s for s in steps if s.stage == "label").commands:
            pairs = argv[argv.index("--pairs") + 1]
            found += _readable("label --pairs", pairs, need="dir", inside=("pairs.jsonl",))
    found += _writable(out)
    if check_layout and trains_on_every_gpu(steps):
        found += layout_problems(cfg, cfg.cluster.world_size)
    return list(recipe_problems) + found
