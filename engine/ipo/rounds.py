"""``vidpo iterate``: rounds of iterative preference optimisation with a critic (IPO), refining the critic
between rounds (Dual-IPO), on the shapes world or on a release directory with a prompt file.

Before round 1: ``iterate.seed_pairs`` pairs sampled from the initial policy are labelled by
``iterate.seed_labeler`` (the shapes world: its oracle, the stand-in for the paper's human labels; a prompt file:
people through a labels file, or the VLM judge) and critic 0 is trained on them (the toy network on the shapes
world; the VLM critic of ``critic.backbone`` on a prompt file's decoded videos). No seed labeller's label is used
for training after that. Round r = 1..R, starting from policy r-1 (round 0 = ``train.init_from``, or the release):

1. generate ``generate.num_pairs`` pairs with policy r-1 (``round_r/pairs``; a latent model's decoded to frames
   and mp4s) and, on the shapes world, ``iterate.eval_pairs`` fresh pairs (``round_r/pairs_eval``) that the oracle
   labels *only to measure the critic*;
2. Dual-IPO (``iterate.refine``, r >= 2): the critic of round r-1 pseudo-labels round r's pairs with K
   stochastic passes and a majority vote; pseudo-labels whose PCE under policy r-1 exceeds 0.5 are kept,
   and critic r is retrained from scratch on the seed labels + the kept pseudo-labels, weighted by their
   PCE (``vidpo.ipo.dual``). On the shapes world the critic's accuracy on ``pairs_eval`` is measured before and
   after (on its pairs, and on every within-prompt pair of its videos: ``critic_accuracy_pool``);
3. label the pairs with critic r: pairwise for flow_dpo / dense_dpo (``label.labeler=critic``; or, with
   ``iterate.pairing=ranked``, each prompt's best-scored videos paired with its worst-scored,
   ``round_r/pairs_ranked``), pointwise for kto (desirable / undesirable by ``critic.desirable`` /
   ``critic.undesirable``; each desirable video is paired with an undesirable one of the same prompt,
   ``round_r/pairs_kto``);
4. train policy r from policy r-1 with the recipe's objective and the real-video flow-matching regularizer
   (``pref.sft_weight``); the reference is policy r-1 (``iterate.reference=previous``) or the initial
   policy (``base``);
5. evaluate policy r: on the shapes world with the oracle on the fixed evaluation seeds (mean, 95% CI, paired
   deltas against the initial policy and the previous round); on a prompt file with the judged evaluation against
   the initial policy (``vidpo.ipo.measure``). The oracle's measurements are absent for a prompt file.

Each stage writes its results atomically and is skipped when they exist; a round is finished when
``round_r/round.json`` exists. A killed run restarted with the same command resumes at the unfinished
stage of the unfinished round (pairs shards, labels, critics and training checkpoints are kept).

``DIR/summary.json``::

    {"rounds": [{"round": r, "oracle": {"mean", "ci95": [lo, hi]}, "critic_accuracy": .., "pseudo_labels_kept": ..,
                 "critic_accuracy_before_refine": .., "delta_vs_base": {..},
                 "critic_accuracy_pool": .., "critic_accuracy_pool_before_refine": .., ...}, ...],
     "base": {"oracle": {"mean", "ci95"}}, ...}                                           (the shapes world)
    {"rounds": [{"round": r, "judged": {"win_rate": {"mean", "ci95"}, "wins", "ties", "losses", ...},
                 "pseudo_labels_kept": .., "labels": {..}, "train": {..}, ...}, ...], "domain": "prompts", ...}

``vidpo iterate A.yaml B.yaml --seeds 0 1 2 --out DIR`` runs every recipe and seed into
``DIR/<recipe>/seed<k>`` and writes the comparison (per round: mean over seeds with a 95% CI over seeds)
to ``DIR/summary.json`` and ``DIR/report.html`` (``vidpo.ipo.report``; the shapes world).

**Under torchrun** (``torchrun --nproc-per-node N -m vidpo iterate ...``, or ``vidpo launch --verb iterate``) the
stages that grow with the data run on every rank as their own verbs do: generation and decoding slice the shards
(with the ``parallel.tp`` / ``parallel.cp`` sampling layout), labelling by a VLM judge or the critic slices the
batches, each round's policy trains over the run's layout (FSDP / TP / SP / CP, the fixed-base reference a frozen
copy split like the policy), the evaluation samples on every rank, and Dual-IPO's implicit rewards (the costly part
of the PCE) are split over the ranks by video. The steps that write one small file run on rank 0 while the others
wait (``RunLayout.on_main``): the oracle's labels, the critic's training (one trainer keeps it equal to one
process's), the votes and pseudo-labels, the pooled re-pairing, the base evaluation, the round row and the
summary. Pairs, labels and critics equal one process's; the trained policies equal it up to the order of
the data-parallel gradient sum.
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
import torch.distributed as dist

from vidpo.config import PREFERENCE_OBJECTIVES, ConfigError, RunConfig, load_config, to_yaml
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE
from vidpo.evaluation.evaluate import (
    EvalResult,
    brief_ci,
    evaluate_model,
    load_eval_result,
    paired_delta,
    save_eval_result,
)
from vidpo.ipo.critic import PreferenceData, load_preference_data, train_critic
from vidpo.ipo.dual import load_pseudo_labels, pool_implicit_rewards, pseudo_label_pairs
from vidpo.ipo.layout import TIMINGS_FILE, RunLayout, open_run
from vidpo.ipo.measure import (
    FreshPairs,
    judged_round,
    labels_agreement,
    oracle_label,
    oracle_scorer,
    pseudo_label_quality,
)
from vidpo.ipo.pairing import build_kto_pairs, build_ranked_pairs
from vidpo.ipo.pool import read_video_pool
from vidpo.ipo.report import write_iterate_report, write_judged_iterate_report
from vidpo.ipo.reuse import reuse_run
from vidpo.labeling.critic import critic_scorer, open_critic
from vidpo.models.critic import save_critic
from vidpo.stages.common import save_samples, setup_logging
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import label_pairs
from vidpo.stages.parts import latent_frames_of
from vidpo.stages.pipeline import generate_and_decode, train_preference
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, build_world, set_threads
from vidpo.training.policy import start_distributed
from vidpo.utils import atomic
from vidpo.utils.lock import LOCK_FILE
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


def generate_round_pairs(run: RunLayout, pairs_dir: Path, policy, n: int, *, stream: Sequence[object],
                         policy_path: Optional[Path] = None) -> None:
    """``n`` pairs sampled by ``policy`` into ``pairs_dir`` from the generation streams of ``stream`` (skipped when
    already there): every set of pairs a run makes has its own streams, so none repeats another's noise. A
    prompt-file run samples with the weights at ``policy_path`` (``policy`` may then be None) and decodes the
    pairs to frames and mp4s (``vidpo.stages.pipeline.generate_and_decode``)."""
    if not run.shapes:
        cfg = _stage_cfg(run.cfg, stream=stream, generate__num_pairs=n, train__init_from=str(policy_path))
        generate_and_decode(cfg, pairs_dir, run.parts, split="train", rank=run.rank, world_size=run.ranks,
                            parallel=run.parallel)
    elif not ((pairs_dir / PAIRS_FILE).exists() and (pairs_dir / "generate.json").exists()):
        cfg = _stage_cfg(run.cfg, stream=stream, generate__num_pairs=n)
        generate_pairs(cfg, pairs_dir, split="train", policy=policy, rank=run.rank, world_size=run.ranks)
    run.barrier()   # rank 0 writes the pairs file once every rank's shards are there


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


def _seed_labeler(cfg: RunConfig) -> str:
    """The labeller of the seed pairs (``iterate.seed_labeler``; 'auto' module doc)."""
    kind, shapes = cfg.iterate.seed_labeler, not cfg.prompts.path
    if kind == "auto":
        kind = "oracle" if shapes else cfg.label.labeler
    if not shapes and kind not in ("human", "vlm"):
        raise ConfigError(f"iterate.seed_labeler: the seed pairs of a prompt file are labelled by people "
                          f"(human, label.human_file) or the VLM judge (vlm), not {kind!r}"
                          + (" (auto reads label.labeler)" if cfg.iterate.seed_labeler == "auto" else ""))
    return kind


def _label_seed(run: RunLayout, pairs_dir: Path) -> None:
    it = run.cfg.iterate
    kind = _seed_labeler(run.cfg)
    if kind == "oracle":
        run.on_main(lambda: oracle_label(run, pairs_dir, granularity=it.seed_granularity,
                                         tie_margin=it.seed_tie_margin))
    elif not (pairs_dir / MANIFEST_FILE).exists():
        cfg = copy.deepcopy(run.cfg)
        cfg.label.labeler = kind
        label_pairs(cfg, pairs_dir, domain=run.domain, rank=run.rank, world_size=run.ranks)
        run.barrier()


def _base_weights(run: RunLayout) -> None:
    """A release without ``train.init_from``: its transformer's own weights saved as policy 0 (once)."""
    # run.exists: every rank decides alike (rank 1, still loading the VAE, could see the file rank 0 just wrote)
    if run.shapes or run.cfg.train.init_from or run.exists(run.base_path):
        return

    def save():
        model = build_policy(run.cfg, None, "cpu")
        atomic.save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, run.base_path)
    run.on_main(save)


# ----- critics ----------------------------------------------------------------------------------------------
def _critic(run: RunLayout, directory: Path, data_fn, *, stream: Sequence[object], steps: int = 0):
    """The critic saved in ``directory``, or one trained on ``data_fn()`` (for ``steps``, 0: critic.steps) and
    saved there. Under torchrun rank 0 trains it (a critic is small next to the policy, and one trainer keeps it
    equal to one process's) and the other ranks read it back."""
    path = directory / "critic.safetensors"
    if run.exists(path):   # every rank alike: one looking after rank 0 saved it would skip on_main's barrier
        return open_critic(path, run.world, run.device)
    cfg = run.cfg
    if steps:
        cfg = copy.deepcopy(cfg)
        cfg.critic.steps = steps

    def train():
        critic, info = train_critic(cfg, data_fn(), run.world, run.segment_ids, stream=stream, device=run.device,
                                    metrics_path=directory / "metrics.jsonl")
        atomic.write_json(directory / "critic.json", info)
        save_critic(critic, path)   # last: its presence means the critic is complete
        return critic
    critic = run.on_main(train)
    return critic if critic is not None else open_critic(path, run.world, run.device)


def _store_timing(run: RunLayout, key: str, seconds: float) -> None:
    """Record how long a stage before the rounds took, in ``DIR/timings.json`` (a resumed or reusing run then
    still knows what its seed labels, critic 0 and base evaluation cost)."""
    if not run.is_main:
        return
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


def _pseudo_labels(run: RunLayout, r: int, critic_prev, policy_prev) -> dict:
    """Round r's Dual-IPO pseudo-labels (``vidpo.ipo.dual``) under policy r-1 and its reference, written once."""
    rd = run.out / f"round_{r}"
    if not run.exists(rd / "critic" / "critic.safetensors"):   # every rank alike (RunLayout.exists)
        pool = read_video_pool(rd / "pairs", run.domain)
        rewards = _implicit_rewards(run, r, pool, policy_prev)

        def write():
            stats = pseudo_label_pairs(rd / "pairs", pool, critic_prev, None, None, run.cfg, run.segment_ids,
                                       tokens=None, stream=("pseudo", r), device=run.device, fps=run.domain.fps,
                                       rewards=rewards)
            atomic.write_json(rd / "pseudo.json", stats)
        run.on_main(write)   # the votes (critic or served judge) and the PCE, written once
    return json.loads((rd / "pseudo.json").read_text())


def _implicit_rewards(run: RunLayout, r: int, pool, policy_prev) -> torch.Tensor:
    """The implicit rewards of round r's pool under policy r-1 and its reference (``vidpo.ipo.dual``), the costly
    part of the PCE (``iterate.pce_timesteps`` forwards of both models per video): under torchrun each rank
    computes every ``ranks``-th video's with both models whole, and all ranks get all of them."""
    policy_prev = policy_prev if policy_prev is not None else load_frozen_policy(run, run.policy_path(r - 1))
    reference = load_frozen_policy(run, run.reference_path(r - 1))
    if run.shapes:
        tokens, process = run.world.tokens(pool.cond_ids), None
    else:   # text embeddings of each video's prompt; the release's own forward process
        tokens = run.parts.conditioning.for_prompts(pool.prompt_ids)
        process = policy_prev if getattr(policy_prev, "training_target", None) is not None else None
    mine = list(range(run.rank, len(pool), run.ranks))
    local = pool_implicit_rewards(pool, _velocity(policy_prev), _velocity(reference), run.cfg, tokens=tokens,
                                  stream=("pseudo", r), device=run.device, process=process, videos=mine)
    if run.ranks == 1:
        return local
    shares: list = [None] * run.ranks
    dist.all_gather_object(shares, local)
    rewards = torch.zeros(len(pool), dtype=torch.float64)
    for rank, share in enumerate(shares):
        rewards[rank::run.ranks] = share
    return rewards


# ----- one round --------------------------------------------------------------------------------------------
def _label_round(run: RunLayout, r: int, critic, critic_dir: Path) -> tuple[Path, dict]:
    """Step 3: the round's training pairs labelled by the critic (or the oracle in the ceiling ablation); returns
    their directory and the label statistics (with the oracle's agreement on the shapes world)."""
    cfg, it, rd = run.cfg, run.cfg.iterate, run.out / f"round_{r}"
    by_oracle = it.round_labeler == "oracle"
    pooled = cfg.train.objective == "kto" or it.pairing == "ranked"
    if pooled:
        kto = cfg.train.objective == "kto"
        train_dir = rd / ("pairs_kto" if kto else "pairs_ranked")
        if not run.exists(train_dir / MANIFEST_FILE):   # every rank alike (RunLayout.exists)
            def pair_up():
                pool = read_video_pool(rd / "pairs", run.domain)
                scorer = oracle_scorer(run) if by_oracle else critic_scorer(critic, cfg, run.world, run.segment_ids)
                source = ("oracle-" if by_oracle else "critic-") + ("pointwise" if kto else "ranked")
                if kto:
                    build_kto_pairs(scorer, pool, train_dir, cfg, run.segment_ids, source=source)
                else:
                    build_ranked_pairs(scorer, pool, train_dir, cfg, run.segment_ids, it.rank_fraction,
                                       margin_fraction=it.margin_fraction, source=source)
            run.on_main(pair_up)   # one scoring pass over the round's pool, then its pairs are written once
        stats = json.loads((train_dir / "label.json").read_text())
    else:
        train_dir = rd / "pairs"
        if not (train_dir / MANIFEST_FILE).exists():
            lcfg = copy.deepcopy(cfg)
            lcfg.label.labeler, lcfg.critic.checkpoint = ("oracle" if by_oracle else "critic"), str(critic_dir)
            label_pairs(lcfg, train_dir, domain=run.domain, rank=run.rank, world_size=run.ranks)
            run.barrier()   # rank 0 writes the manifest from every rank's labels
        stats = json.loads((train_dir / "label.json").read_text())
        stats.pop("problems", None)
    if run.shapes:
        stats["oracle_agreement"] = labels_agreement(run, train_dir)
    return train_dir, stats


def _train_round(run: RunLayout, r: int, train_dir: Path) -> dict:
    """Step 4: policy r trained from policy r-1 on ``train_dir``'s labels."""
    tcfg = copy.deepcopy(run.cfg)
    init = run.policy_path(r - 1)
    tcfg.train.init_from, tcfg.pref.pairs = str(init), str(train_dir.resolve())
    reference = run.reference_path(r)
    return train_preference(tcfg, run.out / f"round_{r}" / "train", resume=True,
                            reference_weights=None if reference.resolve() == init.resolve() else reference,
                            parts=None if run.shapes else run.parts, parallel=run.parallel)


def run_round(run: RunLayout, r: int, critic_prev, base_eval: Optional[EvalResult],
              prev_eval: Optional[EvalResult]) -> tuple[dict, object, Optional[EvalResult]]:
    """Round r (module doc); returns (its summary row, the critic that labelled it, its oracle evaluation: None
    for a prompt file)."""
    cfg, it = run.cfg, run.cfg.iterate
    rd = run.out / f"round_{r}"
    t_round = time.time()
    times = {}
    # A prompt-file run samples from the weights on disk; it needs policy r-1 in memory only for the PCE.
    policy_prev = load_frozen_policy(run, run.policy_path(r - 1)) if run.shapes else None

    t = time.time()
    generate_round_pairs(run, rd / "pairs", policy_prev, cfg.generate.num_pairs, stream=("round", r, "train"),
                         policy_path=run.policy_path(r - 1))
    fresh = None
    if run.shapes:
        generate_round_pairs(run, rd / "pairs_eval", policy_prev, it.eval_pairs, stream=("round", r, "eval"))
        run.on_main(lambda: oracle_label(run, rd / "pairs_eval", granularity="video", tie_margin=0.0))
    times["generate_s"] = round(time.time() - t, 1)

    row: dict = {"round": r}
    if run.shapes:
        fresh = FreshPairs(run, rd / "pairs_eval")
        before, pool_before = fresh.accuracy(critic_prev), fresh.pool(critic_prev)
    critic = critic_prev
    refined = it.refine and r >= 2 and it.round_labeler == "critic"
    if refined:
        t = time.time()
        stats = _pseudo_labels(run, r, critic_prev, policy_prev)   # (loads policy r-1 when it is not in memory)
        critic = _critic(run, rd / "critic", lambda: _refinement_data(run, r), stream=("critic",),
                         steps=it.refine_steps)
        if run.shapes:
            stats.update(pseudo_label_quality(run, rd / "pairs"))
        times["refine_s"] = round(time.time() - t, 1)
        if run.shapes:
            row.update(fresh.row(before, pool_before, fresh.accuracy(critic), fresh.pool(critic)))
        row.update({"pseudo_labels_kept": stats["kept"], "pseudo": stats})
    else:
        if run.shapes:
            row.update(fresh.row(before, pool_before))
        row["pseudo_labels_kept"] = 0
    if run.shapes:
        row["critic_eval_pairs"], row["critic_pool_pairs"] = before["n"], pool_before["n"]

    t = time.time()
    train_dir, row["labels"] = _label_round(run, r, critic, (rd / "critic") if refined else run.critic_dir(r - 1))
    times["label_s"] = round(time.time() - t, 1)

    t = time.time()
    trained = _train_round(run, r, train_dir)
    times["train_s"] = round(time.time() - t, 1)
    row["train"] = {k: v for k, v in trained["result"].items() if k not in ("last", "eval")}
    row["train"]["last"] = {k: v for k, v in trained["result"].get("last", {}).items() if isinstance(v, (int, float))}

    t = time.time()
    model = trained["model"].eval()
    result = None
    # Every rank samples (a sharded policy needs all of them in each forward; the samples are equal), rank 0 writes.
    if run.shapes:
        result = evaluate_model(model, cfg, run.world, run.oracle)
        if run.is_main:
            save_eval_result(result, rd / "eval.safetensors")
            save_samples(result, run.world, run.out / "samples", f"round_{r}", cfg.eval.grid_conditions)
    else:
        row["judged"] = judged_round(run, r, load_frozen_policy(run, run.base_path), model)
    times["eval_s"] = round(time.time() - t, 1)
    if run.shapes:
        summary = result.summary()
        vs_base, vs_prev = paired_delta(result, base_eval), paired_delta(result, prev_eval)
        if r >= 2:   # paired over the evaluation seeds: does iterating add to what round 1 reached?
            row["delta_vs_round_1"] = brief_ci(paired_delta(result, load_eval_result(run.out / "round_1" / "eval.safetensors"))["oracle"])
        row.update({"oracle": brief_ci(summary["oracle"]), "delta_vs_base": brief_ci(vs_base["oracle"]),
                    "delta_vs_previous": brief_ci(vs_prev["oracle"]), "win_rate_vs_base": round(vs_base["win_rate"], 4),
                    "components": {k.split("/", 1)[1]: round(v["mean"], 4) for k, v in summary.items() if "/" in k}})
    row["refined"] = refined
    row["timings"] = dict(times, total_s=round(time.time() - t_round, 1))
    if run.is_main:
        atomic.write_json(rd / "round.json", row)   # last: the round is done
        _log_round(row)
    run.barrier()
    return row, critic, result


class _BaseEvaluation:
    """The initial policy's evaluation on the shapes world, with its sample grid and timing, written once."""

    def __init__(self, run: RunLayout, base: torch.nn.Module):
        self.run, self.base = run, base

    def __call__(self) -> None:
        run, t = self.run, time.time()
        result = evaluate_model(self.base, run.cfg, run.world, run.oracle)
        save_samples(result, run.world, run.out / "samples", "base", run.cfg.eval.grid_conditions)
        save_eval_result(result, run.base_eval_path)
        _store_timing(run, "base_eval_s", time.time() - t)


def _barrier(parallel) -> None:
    if parallel is not None and parallel.world_size > 1:
        dist.barrier()


def _log_round(row: dict) -> None:
    refined = row["refined"]
    if "oracle" not in row:
        win = (row.get("judged") or {}).get("win_rate")
        log.info("round %d: judged win rate vs the initial policy %s, %d training pairs%s", row["round"],
                 f"{win['mean']:.3f} [{win['ci95'][0]:.3f}, {win['ci95'][1]:.3f}]" if win else "n/a",
                 row["train"].get("pairs", 0), f", {row['pseudo_labels_kept']} pseudo-labels kept" if refined else "")
        return
    log.info("round %d: oracle %.4f [%.4f, %.4f], vs base %+.4f [%+.4f, %+.4f], critic accuracy %.3f (%d pairs), "
             "%.3f over %d pool pairs%s", row["round"], row["oracle"]["mean"], *row["oracle"]["ci95"],
             row["delta_vs_base"]["mean"], *row["delta_vs_base"]["ci95"], row["critic_accuracy"] or float("nan"),
             row["critic_eval_pairs"], row["critic_accuracy_pool"] or float("nan"), row["critic_pool_pairs"],
             f" (before refinement {row['critic_accuracy_before_refine']:.3f} / pool "
             f"{row['critic_accuracy_pool_before_refine']:.3f}, {row['pseudo_labels_kept']} pseudo-labels kept)"
             if refined else "")


def _check(cfg: RunConfig) -> None:
    if cfg.train.objective not in PREFERENCE_OBJECTIVES:
        raise ConfigError(f"vidpo iterate: train.objective must be one of {list(PREFERENCE_OBJECTIVES)}, "
                          f"got '{cfg.train.objective}'")
    if cfg.lora is not None:
        raise ConfigError("vidpo iterate trains the full policy each round (round r starts from round r-1's "
                          "weights); remove the lora section")
    if not cfg.prompts.path and not cfg.train.init_from:
        raise ConfigError("train.init_from must name the initial policy (e.g. recipes/shapes/base)")
    if cfg.prompts.path and not cfg.critic.backbone:
        raise ConfigError("vidpo iterate on a prompt file needs critic.backbone: a local vision-language model "
                          "directory for the VLM critic (the toy critic scores the shapes world only)")
    if cfg.prompts.path and cfg.iterate.round_labeler == "oracle":
        raise ConfigError("iterate.round_labeler=oracle needs the shapes world's oracle; a prompt file has none")
    _seed_labeler(cfg)
    if cfg.iterate.refine and cfg.iterate.vote_source == "judge" and (cfg.label.vlm is None or not cfg.label.vlm.model):
        raise ConfigError("iterate.vote_source=judge votes with the VLM judge of label.vlm: set label.vlm.base_url "
                          "and label.vlm.model")


def iterate(cfg: RunConfig, out_dir: str | Path, *, reuse: Optional[str | Path] = None,
            overwrite: bool = False) -> dict:
    """R rounds of IPO / Dual-IPO into ``out_dir`` (resumable; module doc); returns the summary. ``overwrite``
    first empties a folder that holds a run (of any config): the run starts over."""
    cfg = copy.deepcopy(cfg)
    _check(cfg)
    out = Path(out_dir)
    saved = out / "config.yaml"
    # Under torchrun (module doc): the process groups first, so that rank 0 alone prepares the folder.
    parallel = start_distributed(cfg, None if cfg.prompts.path else build_world(cfg), latent_frames_of(cfg))
    main = parallel is None or parallel.is_main
    if overwrite and saved.exists() and main:
        removed = atomic.clear_folder(out, keep=(LOCK_FILE, "vidpo.log"))
        log.info("iterate: --overwrite: removed %d entries of %s", removed, out)
    _barrier(parallel)
    setup_logging(out)
    set_threads(cfg)
    # Compare after loading, so fields added to the config since the run started read as their defaults.
    if saved.exists() and to_yaml(load_config(saved)) != to_yaml(cfg):
        raise ConfigError(f"{out} holds a run of a different config ({saved}); use a new --out, the same "
                          "recipe and --set overrides to resume, or --overwrite to start it over")
    _barrier(parallel)   # every rank has compared before rank 0 writes
    if main:
        atomic.write_text(saved, to_yaml(cfg))
        if reuse is not None:
            reuse_run(cfg, out, reuse)
    _barrier(parallel)
    run = open_run(out, cfg)
    if parallel is not None:
        run.parallel, run.device = parallel, parallel.device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    log.info("iterate: seed %d on %s%s%s", cfg.seed, run.device,
             f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "",
             f", rank {run.rank} of {run.ranks}" if run.ranks > 1 else "")
    cfg, world = run.cfg, run.world
    t0 = time.time()
    if not run.shapes:
        run.parts   # prompt embeddings, VAE
        _base_weights(run)

    base = load_frozen_policy(run, run.base_path) if run.shapes else None   # a prompt file samples from disk
    t = time.time()
    fresh = not (out / "seed" / "pairs" / MANIFEST_FILE).exists()
    generate_round_pairs(run, out / "seed" / "pairs", base, cfg.iterate.seed_pairs, stream=("seed",),
                         policy_path=run.base_path)
    _label_seed(run, out / "seed" / "pairs")
    if fresh:
        _store_timing(run, "seed_labels_s", time.time() - t)
    fresh, t = not (out / "critic_0" / "critic.safetensors").exists(), time.time()
    critic = _critic(run, out / "critic_0", lambda: _seed_data(run), stream=("critic",))
    if fresh:
        _store_timing(run, "critic_0_s", time.time() - t)

    base_eval = None
    if not run.shapes:
        pass
    elif run.exists(out / "base_eval.safetensors"):   # every rank alike (RunLayout.exists)
        base_eval = load_eval_result(out / "base_eval.safetensors")
    else:
        run.on_main(_BaseEvaluation(run, base))   # the initial policy is whole on every rank: rank 0 samples it
        base_eval = load_eval_result(out / "base_eval.safetensors")
    del base

    rows, prev_eval = [], base_eval
    for r in range(1, cfg.iterate.rounds + 1):
        done = out / f"round_{r}" / "round.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            if run.shapes:
                prev_eval = load_eval_result(out / f"round_{r}" / "eval.safetensors")
            critic = open_critic(run.critic_dir(r), world, run.device)
            log.info("round %d: done before, read back", r)
            continue
        row, critic, prev_eval = run_round(run, r, critic, base_eval, prev_eval)
        rows.append(row)
    seed_info = json.loads((out / "critic_0" / "critic.json").read_text())
    summary = {"rounds": rows}
    if run.shapes:
        summary["base"] = {"oracle": brief_ci(base_eval.summary()["oracle"]),
                           "components": {k.split("/", 1)[1]: round(v["mean"], 4)
                                          for k, v in base_eval.summary().items() if "/" in k}}
    else:
        summary["domain"] = "prompts"
    summary.update({
        "objective": cfg.train.objective, "reference": cfg.iterate.reference, "refine": cfg.iterate.refine,
        "seed": cfg.seed, "seed_labels": {"pairs": seed_info["pairs"], "labeler": _seed_labeler(run.cfg),
                                          "critic_0": seed_info},
        "timings": _run_timings(run, rows, time.time() - t0),
    })
    if run.is_main:
        atomic.write_json(out / "summary.json", summary)
        if run.shapes:
            write_iterate_report(out, summary)
        else:
            write_judged_iterate_report(out, summary)
    run.barrier()
    return summary
