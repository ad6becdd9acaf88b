"""Evaluation: oracle scores of a model's samples on fixed seeds, with 95% confidence intervals.

Samples are drawn with the ``("eval", i)`` noise streams for ``i`` in ``seed_offset + [0, n)`` and the
conditions cycle over the world's whole condition set, so two models evaluated with the same config see
the same noise and conditions: their per-sample scores are *paired*, and the delta's confidence interval
is the paired one (much tighter than the difference of two independent intervals).

Sampling: a policy with a sampler hook (a diffusers adapter: Wan, CogVideoX) samples with its own scheduler
and CFG (``vidpo.models.sampling``); the toy DiT with the engine's Euler rectified-flow sampler. Either way the
noise of sample ``i`` depends only on ``(seed, stream, i)``.

Intervals: mean +- t_{0.975, n-1} * sd / sqrt(n) (Student t; normal for n > 120).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file

from vidpo.config import RunConfig
from vidpo.models import flow
from vidpo.models.sampling import has_sampler_hook
from vidpo.utils import atomic

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table + conservative lookup of the next lower dof)."""
    if dof <= 0:
        return float("nan")
    if dof > 120:
        return 1.960
    keys = sorted(k for k in _T975 if k <= dof)
    return _T975[keys[-1]]


def mean_ci(values: torch.Tensor) -> dict:
    """``{"mean", "ci95": [lo, hi], "std", "n"}`` of a 1-D sample."""
    values = values.double().flatten()
    n = values.numel()
    mean = values.mean().item()
    if n < 2:
        return {"mean": mean, "ci95": [mean, mean], "std": 0.0, "n": n}
    std = values.std(unbiased=True).item()
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "std": std, "n": n}


@dataclass
class EvalResult:
    total: torch.Tensor                   # (n,) oracle total per sample
    components: dict[str, torch.Tensor]   # name -> (n,)
    samples: torch.Tensor                 # (n, 3, T, H, W) in [-1, 1]
    cond_ids: torch.Tensor                # (n, 3)
    modes: dict[str, torch.Tensor] = field(default_factory=dict)  # bad mode -> (n,) bool (the oracle's failure_modes)

    def summary(self) -> dict:
        out = {"oracle": mean_ci(self.total)}
        for name, values in self.components.items():
            out[f"oracle/{name}"] = mean_ci(values)
        for name, flags in self.modes.items():  # rates: the share of samples that show each bad mode
            out[f"mode/{name}"] = mean_ci(flags.double())
        return out

    def flat(self) -> dict:
        """Flat numeric dict for metrics.jsonl: ``oracle/total`` and per-component means with CI bounds."""
        row = {}
        for key, stats in self.summary().items():
            name = "oracle/total" if key == "oracle" else key
            row[name] = stats["mean"]
            if not key.startswith("mode/"):  # rates are plotted plain; their CIs stay in summary.json
                row[name + "_ci_lo"], row[name + "_ci_hi"] = stats["ci95"]
        return row


def eval_conditions(world, n: int) -> torch.Tensor:
    """The fixed condition list of an evaluation: cycles over every condition of the world."""
    return world.condition(torch.arange(n) % world.num_conditions)


@torch.no_grad()
def sample_model(model, world, cond_ids: torch.Tensor, *, seed: int, indices: Sequence[int], steps: int,
                 cfg_scale: float, batch_size: int = 64, stream: str = "eval") -> torch.Tensor:
    """Samples of the shapes world for ``cond_ids`` with noise streams ``(seed, stream, indices[k])``; returns
    CPU fp32 clips in [-1, 1]."""
    cfgw = world.cfg
    clips = sample_videos(model, world.tokens(cond_ids), (3, cfgw.frames, cfgw.height, cfgw.width), seed=seed,
                          indices=indices, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size, stream=stream)
    return clips.clamp(-1, 1)


@torch.no_grad()
def sample_videos(model, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int], steps: int,
                  cfg_scale: float, negative: Optional[torch.Tensor] = None, batch_size: int = 64,
                  stream: str = "eval") -> torch.Tensor:
    """``len(indices)`` samples of ``shape`` (latents, or pixels for a pixel-space model), row k conditioned on
    ``cond[k]`` from the noise of ``(seed, stream, indices[k])``; the unconditional branch of guidance is
    ``negative[k]`` (a negative prompt's embeddings) or the model's null condition. CPU fp32, unclamped."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        c = cond[start:start + len(idx)].to(device)
        null = model.null_condition(c) if negative is None else negative[start:start + len(idx)].to(device)
        if has_sampler_hook(model):
            # the model's own scheduler (a v-prediction DDPM must not be integrated as a velocity).
            x = model.sample(c, shape, seed=seed, indices=idx, steps=steps, cfg_scale=cfg_scale, stream=stream,
                             null_cond=null)
        else:
            # a context-parallel model's forward returns its own frames: integrate the gathered whole clip
            forward = getattr(model, "whole_clip_forward", model)
            x = flow.sample(lambda x, t, c: forward(x.to(dtype), t.to(dtype), c).float(), (len(idx),) + tuple(shape),
                            c, seed=seed, indices=idx, null_cond=null, cfg_scale=cfg_scale, steps=steps,
                            stream=stream, device=device)
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def evaluate_model(model, cfg: RunConfig, world, oracle, *, num_samples: Optional[int] = None,
                   segment_ids: Optional[torch.Tensor] = None) -> EvalResult:
    """Oracle-score ``num_samples`` samples of ``model`` on the evaluation seeds of ``cfg``."""
    n = num_samples or cfg.eval.num_samples
    cond_ids = eval_conditions(world, n)
    indices = [cfg.eval.seed_offset + i for i in range(n)]
    clips = sample_model(model, world, cond_ids, seed=cfg.seed, indices=indices, steps=cfg.eval.steps,
                         cfg_scale=cfg.eval.cfg_scale, batch_size=cfg.sample.batch_size)
    score = oracle.score(clips, cond_ids, segment_ids)
    return EvalResult(total=score.total.detach(), components={k: v.detach() for k, v in score.components.items()},
                      samples=clips, cond_ids=cond_ids, modes=oracle.failure_modes(clips, cond_ids))


def paired_delta(final: EvalResult, base: EvalResult) -> dict:
    """Paired comparison on the same seeds: delta mean with CI, per component, and the win rate."""
    delta = final.total - base.total
    out = {"oracle": mean_ci(delta)}
    for name in final.components:
        out[f"oracle/{name}"] = mean_ci(final.components[name] - base.components[name])
    for name in final.modes.keys() & base.modes.keys():
        out[f"mode/{name}"] = mean_ci(final.modes[name].double() - base.modes[name].double())
    wins = (delta > 0).double().mean().item()
    ties = (delta == 0).double().mean().item()
    out["win_rate"] = wins + 0.5 * ties
    return out


def brief_ci(stats: dict, digits: int = 6) -> dict:
    """A ``mean_ci`` result as ``{"mean", "ci95"}`` rounded to ``digits`` (what run summaries store)."""
    return {"mean": round(stats["mean"], digits), "ci95": [round(v, digits) for v in stats["ci95"]]}


def load_eval_result(path: str | Path) -> EvalResult:
    """Per-sample scores saved by ``save_eval_result`` (no samples: ``samples`` is empty)."""
    t = load_file(str(path))
    comps = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("component/")}
    return EvalResult(total=t["total"], components=comps, samples=torch.zeros(0), cond_ids=t["cond_ids"])


def save_eval_result(result: EvalResult, path: str | Path) -> None:
    """Per-sample scores (total, components, conditions) of ``result``, atomically, for paired deltas later."""
    tensors = {"total": result.total, "cond_ids": result.cond_ids}
    tensors.update({f"component/{k}": v for k, v in result.components.items()})
    atomic.save_safetensors(tensors, path)
