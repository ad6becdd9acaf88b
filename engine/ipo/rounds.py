"""``vidpo iterate``: rounds of iterative preference optimisation with a critic (IPO), refining the critic
between rounds (Dual-IPO).

Before round 1: ``iterate.seed_pairs`` pairs sampled from the initial policy are labelled by the oracle
(the stand-in for the paper's human labels) and critic 0 is trained on them. No oracle label is used for
training after that. Round r = 1..R, starting from policy r-1 (round 0 = ``train.init_from``):

1. generate ``generate.num_pairs`` pairs with policy r-1 (``round_r/pairs``) and ``iterate.eval_pairs``
   fresh pairs (``round_r/pairs_eval``) that the oracle labels *only to measure the critic*;
2. Dual-IPO (``iterate.refine``, r >= 2): the critic of round r-1 pseudo-labels round r's pairs with K
   stochastic passes and a majority vote; pseudo-labels whose PCE under policy r-1 exceeds 0.5 are kept,
   and critic r is retrained from scratch on the seed labels + the kept pseudo-labels, weighted by their
   PCE (``vidpo.ipo.dual``). The critic's accuracy on ``pairs_eval`` is measured before and after (on its
   pairs, and on every within-prompt pair of its videos: ``critic_accuracy_pool``);
3. label the pairs with critic r: pairwise for flow_dpo / dense_dpo (``label.labeler=critic``; or, with
   ``iterate.pairing=ranked``, each prompt's best-scored videos paired with its worst-scored,
   ``round_r/pairs_ranked``), pointwise for kto (desirable / undesirable by ``critic.desirable`` /
   ``critic.undesirable``; each desirable video is paired with an undesirable one of the same prompt,
   ``round_r/pairs_kto``);
4. train policy r from policy r-1 with the recipe's objective and the real-video flow-matching regularizer
   (``pref.sft_weight``); the reference is policy r-1 (``iterate.reference=previous``) or the initial
   policy (``base``);
5. evaluate policy r with the oracle on the fixed evaluation seeds (mean, 95% CI, paired deltas against
   the initial policy and the previous round).

Each stage writes its results atomically and is skipped when they exist; a round is finished when
``round_r/round.json`` exists. A killed run restarted with the same command resumes at the unfinished
stage of the unfinished round (pairs shards, labels, critics and training checkpoints are kept).

``DIR/summary.json``::

    {"rounds": [{"round": r, "oracle": {"mean", "ci95": [lo, hi]}, "critic_accuracy": .., "pseudo_labels_kept": ..,
                 "critic_accuracy_before_refine": .., "delta_vs_base": {..},
                 "critic_accuracy_pool": .., "critic_accuracy_pool_before_refine": .., ...}, ...],
     "base": {"oracle": {"mean", "ci95"}}, ...}

``vidpo iterate A.yaml B.yaml --seeds 0 1 2 --out DIR`` runs every recipe and seed into
``DIR/<recipe>/seed<k>`` and writes the comparison (per round: mean over seeds with a 95% CI over seeds)
to ``DIR/summary.json`` and ``DIR/report.html`` (``vidpo.ipo.report``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.config import PREFERENCE_OBJECTIVES, ConfigError, RunConfig, load_config, to_yaml
from vidpo.data.oracle import COMPONENTS
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE
from vidpo.evaluation.evaluate import (
    EvalResult,
    brief_ci,
    evaluate_model,
    load_eval_result,
    mean_ci,
    paired_delta,
    save_eval_result,
)
from vidpo.ipo.critic import (
    PreferenceData,
    critic_accuracy,
    load_preference_data,
    pool_accuracy,
    pool_gain,
    train_critic,
)
from vidpo.ipo.dual import load_pseudo_labels, pseudo_label_pairs, read_pseudo_rows
from vidpo.ipo.layout import TIMINGS_FILE, RunLayout, open_run
from vidpo.ipo.pairing import build_kto_pairs, build_ranked_pairs, read_pool
from vidpo.ipo.report import write_iterate_report
from vidpo.ipo.reuse import reuse_run
from vidpo.labeling.critic import critic_scorer
from vidpo.models.critic import CriticScores, load_critic, save_critic
from vidpo.stages.common import save_samples, setup_logging
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import label_pairs
from vidpo.stages.pipeline import train_preference
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, set_threads
from vidpo.utils import atomic
from vidpo.utils.seeding import derive_seed

log = logging.getLogger("vidpo")


# ----- small stages ---------------------------------------------------------------------------------------
def _stage_cfg(cfg: RunConfig, *, stream: Sequence[object], **sections) -> RunConfig:
    """A copy of ``cfg`` whose generation streams are those of ``stream`` (and with ``section.field`` edits)."""
    out = copy.deepcopy(cfg)
    out.seed = derive_seed(cfg.seed, "iterate", *stream) % (2 ** 31)
    for dotted, value in sections.items():
        section, name = dotted.split("__")
        setattr(getattr(out, section), name, value)
    return out


def generate_round_pairs(run: RunLayout, pairs_dir: Path, policy, n: int, *, stream: Sequence[object]) -> None:
    """``n`` pairs sampled by ``policy`` into ``pairs_dir`` from the generation streams of ``stream`` (skipped when
    already there): every set of pairs a run makes has its own streams, so none repeats another's noise."""
    if (pairs_dir / PAIRS_FILE).exists() and (pairs_dir / "generate.json").exists():
        return
    cfg = _stage_cfg(run.cfg, stream=stream, generate__num_pairs=n)
    generate_pairs(cfg, pairs_dir, split="train", policy=policy)


def _oracle_label(run: RunLayout, pairs_dir: Path, *, granularity: str, tie_margin: float) -> None:
    if (pairs_dir / MANIFEST_FILE).exists():
        return
    cfg = copy.deepcopy(run.cfg)
    cfg.label.labeler, cfg.label.granularity, cfg.label.tie_margin = "oracle", granularity, tie_margin
    label_pairs(cfg, pairs_dir)


def load_frozen_policy(run: RunLayout, path: Path) -> torch.nn.Module:
    """The run's model with the weights at ``path``, in eval mode and without gradients (a sampler or scorer)."""
    model = build_policy(run.cfg, run.world, run.device)
    ckpt.load_weights(model, path)
    return model.eval().requires_grad_(False)


def _velocity(model):
    dtype = next(model.parameters()).dtype

    def v(x, t, c):
        return model(x.to(dtype), t.to(dtype), c).float()
    return v


def _oracle_video_labels(run: RunLayout, data: PreferenceData) -> torch.Tensor:
    """The oracle's whole-video verdicts (N,) of in-memory pairs (for measurements only, never for training)."""
    with torch.no_grad():
        d = (run.oracle.score(data.first, data.cond_ids).total.double()
             - run.oracle.score(data.second, data.cond_ids).total.double())
    return torch.sign(d).long()


def _oracle_scorer(run: RunLayout):
    """The oracle as a ``vidpo.labeling.critic.PoolScorer`` (the ceiling ablation, ``iterate.round_labeler=oracle``)."""
    def score(videos: torch.Tensor, cond: torch.Tensor) -> CriticScores:
        with torch.no_grad():
            out = run.oracle.score(videos, cond, run.segment_ids)
        frames = torch.stack([out.frame_components[k] for k in COMPONENTS]).mean(0)
        return CriticScores(frames=frames, segments=out.segments, video=out.total)
    return score


def _pool_pairs_agreement(run: RunLayout, pairs_dir: Path) -> float:
    """How often the oracle prefers the preferred video of critic-built pairs (KTO / ranked; a measurement)."""
    data = load_preference_data(pairs_dir, run.num_segments)
    return _agreement(data.video_labels, _oracle_video_labels(run, data))


def _agreement(labels: torch.Tensor, truth: torch.Tensor) -> Optional[float]:
    keep = (labels != 0) & (truth != 0)
    return float((labels[keep] == truth[keep]).double().mean()) if bool(keep.any()) else None


# ----- critics ----------------------------------------------------------------------------------------------
def _critic(run: RunLayout, directory: Path, data_fn, *, stream: Sequence[object], steps: int = 0):
    """The critic saved in ``directory``, or one trained on ``data_fn()`` (for ``steps``, 0: critic.steps) and
    saved there."""
    path = directory / "critic.safetensors"
    if path.exists():
        return load_critic(path, run.device)
    cfg = run.cfg
    if steps:
        cfg = copy.deepcopy(cfg)
        cfg.critic.steps = steps
    critic, info = train_critic(cfg, data_fn(), run.world, run.segment_ids, stream=stream, device=run.device,
                                metrics_path=directory / "metrics.jsonl")
    atomic.write_json(directory / "critic.json", info)
    save_critic(critic, path)   # last: its presence means the critic is complete
    return critic


def _store_timing(run: RunLayout, key: str, seconds: float) -> None:
    """Record how long a stage before the rounds took, in ``DIR/timings.json`` (a resumed or reusing run then
    still knows what its seed labels, critic 0 and base evaluation cost)."""
    path = run.out / TIMINGS_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[key] = round(seconds, 1)
    atomic.write_json(path, stored)


def _run_timings(run: RunLayout, rows: list[dict], this_call_s: float) -> dict:
    """Stage times (seed labels, critic 0, base evaluation) + each round's, and ``total_s``: their sum, i.e.
    the compute of the whole run however many calls (resumes, reused stages) it took; ``this_call_s``: the
    wall time of this call alone."""
    path = run.out / TIMINGS_FILE
    stages = json.loads(path.read_text()) if path.exists() else {}
    rounds = {f"round_{row['round']}_s": row.get("timings", {}).get("total_s", 0.0) for row in rows}
    return dict(stages, **rounds, total_s=round(sum(stages.values()) + sum(rounds.values()), 1),
                this_call_s=round(this_call_s, 1))


def _seed_data(run: RunLayout) -> PreferenceData:
    return load_preference_data(run.out / "seed" / "pairs", run.num_segments)


def _refinement_data(run: RunLayout, r: int) -> PreferenceData:
    """Seed labels (weight 1) + kept pseudo-labels (weight = PCE) of round r (and earlier rounds)."""
    parts = [_seed_data(run)]
    first = 2 if run.cfg.iterate.accumulate_pseudo else r
    for k in range(first, r + 1):
        pseudo = load_pseudo_labels(run.out / f"round_{k}" / "pairs", run.num_segments)
        if pseudo is not None:
            parts.append(pseudo)
    return PreferenceData.concat(parts)


# ----- one round --------------------------------------------------------------------------------------------
def run_round(run: RunLayout, r: int, critic_prev, base_eval: EvalResult,
              prev_eval: EvalResult) -> tuple[dict, object, EvalResult]:
    """Round r (module doc); returns (its summary row, the critic that labelled it, its evaluation)."""
    cfg, it = run.cfg, run.cfg.iterate
    rd = run.out / f"round_{r}"
    t_round = time.time()
    times = {}
    policy_prev = load_frozen_policy(run, run.policy_path(r - 1))

    t = time.time()
    generate_round_pairs(run, rd / "pairs", policy_prev, cfg.generate.num_pairs, stream=("round", r, "train"))
    generate_round_pairs(run, rd / "pairs_eval", policy_prev, it.eval_pairs, stream=("round", r, "eval"))
    _oracle_label(run, rd / "pairs_eval", granularity="video", tie_margin=0.0)
    times["generate_s"] = round(time.time() - t, 1)
    eval_pairs = load_preference_data(rd / "pairs_eval", run.num_segments)

    row: dict = {"round": r}
    before = critic_accuracy(critic_prev, eval_pairs, run.world, run.segment_ids)
    # The same measurement over every within-prompt pair of the fresh videos (~7x the pairs; vidpo.ipo.critic.pool_accuracy)
    pool_videos = torch.cat([eval_pairs.first, eval_pairs.second])
    pool_cond = torch.cat([eval_pairs.cond_ids, eval_pairs.cond_ids])
    with torch.no_grad():
        pool_truth = run.oracle.score(pool_videos, pool_cond).total

    def pool(c):
        return pool_accuracy(c, pool_videos, pool_cond, pool_truth, run.world, run.segment_ids)
    pool_before = pool(critic_prev)
    critic = critic_prev
    refined = it.refine and r >= 2 and it.round_labeler == "critic"
    if refined:
        t = time.time()
        if not (rd / "critic" / "critic.safetensors").exists():
            reference = load_frozen_policy(run, run.reference_path(r - 1))
            stats = pseudo_label_pairs(rd / "pairs", critic_prev, _velocity(policy_prev), _velocity(reference), cfg,
                                       run.world, run.segment_ids, stream=("pseudo", r), device=run.device)
            atomic.write_json(rd / "pseudo.json", stats)
        stats = json.loads((rd / "pseudo.json").read_text())
        critic = _critic(run, rd / "critic", lambda: _refinement_data(run, r), stream=("critic",),
                         steps=it.refine_steps)
        stats.update(_pseudo_label_quality(run, rd / "pairs"))
        times["refine_s"] = round(time.time() - t, 1)
        after = critic_accuracy(critic, eval_pairs, run.world, run.segment_ids)
        pool_after = pool(critic)
        row.update({"critic_accuracy": after["accuracy"], "critic_accuracy_before_refine": before["accuracy"],
                    "critic_accuracy_gain": brief_ci(mean_ci(after["correct"] - before["correct"])),
                    "critic_accuracy_pool": pool_after["accuracy"],
                    "critic_accuracy_pool_before_refine": pool_before["accuracy"],
                    "critic_accuracy_pool_gain": brief_ci(pool_gain(pool_after, pool_before)),
                    "pseudo_labels_kept": stats["kept"], "pseudo": stats})
    else:
        row.update({"critic_accuracy": before["accuracy"], "critic_accuracy_before_refine": None,
                    "critic_accuracy_pool": pool_before["accuracy"], "critic_accuracy_pool_before_refine": None,
                    "pseudo_labels_kept": 0})
    row["critic_eval_pairs"], row["critic_pool_pairs"] = before["n"], pool_before["n"]

    t = time.time()
    critic_dir = (rd / "critic") if refined else run.critic_dir(r - 1)
    by_oracle = it.round_labeler == "oracle"
    scorer = _oracle_scorer(run) if by_oracle else critic_scorer(critic, cfg, run.world, run.segment_ids)
    if cfg.train.objective == "kto":
        train_dir = rd / "pairs_kto"
        row["labels"] = dict(build_kto_pairs(scorer, rd / "pairs", train_dir, cfg, run.world, run.segment_ids,
                                             source="oracle-pointwise" if by_oracle else "critic-pointwise"))
        row["labels"]["oracle_agreement"] = _pool_pairs_agreement(run, train_dir)
    elif it.pairing == "ranked":
        train_dir = rd / "pairs_ranked"
        row["labels"] = dict(build_ranked_pairs(scorer, rd / "pairs", train_dir, cfg, run.world, run.segment_ids,
                                                it.rank_fraction, margin_fraction=it.margin_fraction,
                                                source="oracle-ranked" if by_oracle else "critic-ranked"))
        row["labels"]["oracle_agreement"] = _pool_pairs_agreement(run, train_dir)
    else:
        train_dir = rd / "pairs"
        if not (train_dir / MANIFEST_FILE).exists():
            lcfg = copy.deepcopy(cfg)
            lcfg.label.labeler, lcfg.critic.checkpoint = ("oracle" if by_oracle else "critic"), str(critic_dir)
            label_pairs(lcfg, train_dir)
        stats = json.loads((train_dir / "label.json").read_text())
        stats.pop("problems", None)
        labelled = load_preference_data(train_dir, run.num_segments)
        stats["oracle_agreement"] = _agreement(labelled.video_labels, _oracle_video_labels(run, labelled))
        row["labels"] = stats
    times["label_s"] = round(time.time() - t, 1)

    t = time.time()
    tcfg = copy.deepcopy(cfg)
    init = run.policy_path(r - 1)
    tcfg.train.init_from, tcfg.pref.pairs = str(init), str(train_dir.resolve())
    reference = run.reference_path(r)
    trained = train_preference(tcfg, rd / "train", resume=True,
                               reference_weights=None if reference.resolve() == init.resolve() else reference)
    times["train_s"] = round(time.time() - t, 1)
    row["train"] = {k: v for k, v in trained["result"].items() if k not in ("last", "eval")}
    row["train"]["last"] = {k: v for k, v in trained["result"].get("last", {}).items() if isinstance(v, (int, float))}

    t = time.time()
    model = trained["model"].eval()
    result = evaluate_model(model, cfg, run.world, run.oracle)
    save_eval_result(result, rd / "eval.safetensors")

    save_samples(result, run.world, run.out / "samples", f"round_{r}", cfg.eval.grid_conditions)
    times["eval_s"] = round(time.time() - t, 1)
    summary = result.summary()
    vs_base, vs_prev = paired_delta(result, base_eval), paired_delta(result, prev_eval)
    if r >= 2:   # paired over the evaluation seeds: does iterating add to what round 1 reached?
        row["delta_vs_round_1"] = brief_ci(paired_delta(result, load_eval_result(run.out / "round_1" / "eval.safetensors"))["oracle"])
    row.update({"oracle": brief_ci(summary["oracle"]), "delta_vs_base": brief_ci(vs_base["oracle"]),
                "delta_vs_previous": brief_ci(vs_prev["oracle"]), "win_rate_vs_base": round(vs_base["win_rate"], 4),
                "components": {k.split("/", 1)[1]: round(v["mean"], 4) for k, v in summary.items() if "/" in k},
                "refined": refined})
    row["timings"] = dict(times, total_s=round(time.time() - t_round, 1))
    atomic.write_json(rd / "round.json", row)   # last: the round is done
    log.info("round %d: oracle %.4f [%.4f, %.4f], vs base %+.4f [%+.4f, %+.4f], critic accuracy %.3f (%d pairs), "
             "%.3f over %d pool pairs%s", r, row["oracle"]["mean"], *row["oracle"]["ci95"],
             row["delta_vs_base"]["mean"], *row["delta_vs_base"]["ci95"], row["critic_accuracy"] or float("nan"), row["critic_eval_pairs"],
             row["critic_accuracy_pool"] or float("nan"), row["critic_pool_pairs"],
             f" (before refinement {row['critic_accuracy_before_refine']:.3f} / pool "
             f"{row['critic_accuracy_pool_before_refine']:.3f}, {row['pseudo_labels_kept']} pseudo-labels kept)"
             if refined else "")
    return row, critic, result


def _pseudo_label_quality(run: RunLayout, pairs_dir: Path) -> dict:
    """Oracle agreement of the kept and of the dropped pseudo-labels (a measurement; not used for training)."""
    rows = read_pseudo_rows(pairs_dir)
    videos, cond = read_pool(pairs_dir)   # each pair is two indices into the round's videos: score each once
    with torch.no_grad():
        truth_scores = run.oracle.score(videos, cond).total.double()
    first = torch.tensor([r["first_video"] for r in rows], dtype=torch.long)
    second = torch.tensor([r["second_video"] for r in rows], dtype=torch.long)
    truth = torch.sign(truth_scores[first] - truth_scores[second]).long()
    votes = torch.tensor([r["video_label"] for r in rows], dtype=torch.long)
    kept = torch.tensor([bool(r["kept"]) for r in rows], dtype=torch.bool)
    return {"oracle_agreement_kept": _agreement(votes[kept], truth[kept]),
            "oracle_agreement_dropped": _agreement(votes[~kept], truth[~kept]),
            "oracle_agreement_all_votes": _agreement(votes, truth)}


def iterate(cfg: RunConfig, out_dir: str | Path, *, reuse: Optional[str | Path] = None) -> dict:
    """R rounds of IPO / Dual-IPO into ``out_dir`` (resumable; module doc); returns the summary."""
    cfg = copy.deepcopy(cfg)
    if cfg.train.objective not in PREFERENCE_OBJECTIVES:
        raise ConfigError(f"vidpo iterate: train.objective must be one of {list(PREFERENCE_OBJECTIVES)}, "
                          f"got '{cfg.train.objective}'")
    if cfg.lora is not None:
        raise ConfigError("vidpo iterate trains the full policy each round (round r starts from round r-1's "
                          "weights); remove the lora section")
    if not cfg.train.init_from:
        raise ConfigError("train.init_from must name the initial policy (e.g. recipes/shapes/base)")
    out = Path(out_dir)
    setup_logging(out)
    set_threads(cfg)
    saved = out / "config.yaml"
    # Compare after loading, so fields added to the config since the run started read as their defaults.
    if saved.exists() and to_yaml(load_config(saved)) != to_yaml(cfg):
        raise ConfigError(f"{out} holds a run of a different config ({saved}); use a new --out, or the same "
                          "recipe and --set overrides to resume")
    atomic.write_text(saved, to_yaml(cfg))
    if reuse is not None:
        reuse_run(cfg, out, reuse)
    run = open_run(out, cfg)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    log.info("iterate: seed %d on %s%s", cfg.seed, run.device,
             f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    cfg, world = run.cfg, run.world
    t0 = time.time()

    base = load_frozen_policy(run, run.base_path)
    t = time.time()
    fresh = not (out / "seed" / "pairs" / MANIFEST_FILE).exists()
    generate_round_pairs(run, out / "seed" / "pairs", base, cfg.iterate.seed_pairs, stream=("seed",))
    _oracle_label(run, out / "seed" / "pairs", granularity=cfg.iterate.seed_granularity,
                  tie_margin=cfg.iterate.seed_tie_margin)
    if fresh:
        _store_timing(run, "seed_labels_s", time.time() - t)
    fresh, t = not (out / "critic_0" / "critic.safetensors").exists(), time.time()
    critic = _critic(run, out / "critic_0", lambda: _seed_data(run), stream=("critic",))
    if fresh:
        _store_timing(run, "critic_0_s", time.time() - t)

    if (out / "base_eval.safetensors").exists():
        base_eval = load_eval_result(out / "base_eval.safetensors")
    else:
        t = time.time()
        base_eval = evaluate_model(base, cfg, world, run.oracle)
        save_samples(base_eval, world, out / "samples", "base", cfg.eval.grid_conditions)
        save_eval_result(base_eval, out / "base_eval.safetensors")
        _store_timing(run, "base_eval_s", time.time() - t)
    del base

    rows, prev_eval = [], base_eval
    for r in range(1, cfg.iterate.rounds + 1):
        done = out / f"round_{r}" / "round.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            prev_eval = load_eval_result(out / f"round_{r}" / "eval.safetensors")
            critic = load_critic(run.critic_dir(r), run.device)
            log.info("round %d: done before, read back", r)
            continue
        row, critic, prev_eval = run_round(run, r, critic, base_eval, prev_eval)
        rows.append(row)
    seed_info = json.loads((out / "critic_0" / "critic.json").read_text())
    summary = {
        "rounds": rows,
        "base": {"oracle": brief_ci(base_eval.summary()["oracle"]),
                 "components": {k.split("/", 1)[1]: round(v["mean"], 4) for k, v in base_eval.summary().items()
                                if "/" in k}},
        "objective": cfg.train.objective, "reference": cfg.iterate.reference, "refine": cfg.iterate.refine,
        "seed": cfg.seed, "seed_labels": {"pairs": seed_info["pairs"], "critic_0": seed_info},
        "timings": _run_timings(run, rows, time.time() - t0),
    }
    atomic.write_json(out / "summary.json", summary)

    write_iterate_report(out, summary)
    return summary


