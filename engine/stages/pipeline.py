"""The preference pipeline: ``generate -> label -> train -> eval -> report`` (``vidpo run``).

Each stage is a CLI verb and a function, and each is resumable:
  * generate: shards are written atomically one by one; a rerun skips complete shards;
  * label:    labelled pairs are appended to ``labels.partial.jsonl`` batch by batch, so a rerun (after a kill,
              or a VLM server outage) labels only what is left; ``manifest.jsonl`` is written at the end;
  * train:    checkpoints + exact resume (``vidpo.training.trainer``);
  * eval/report: recomputed from the saved weights.

``vidpo run RECIPE --out DIR`` puts pairs in ``DIR/pairs`` (and ``DIR/pairs_heldout``), the training run
(checkpoints, metrics.jsonl) in ``DIR`` itself, and writes ``DIR/summary.json`` and ``DIR/report.html``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from vidpo.config import ConfigError, RunConfig, resolve_path, to_yaml
from vidpo.data.domains import ShapesDomain, exact_oracle
from vidpo.data.pairs import (
    MANIFEST_FILE,
    PAIRS_FILE,
    PairRecord,
    ShardReader,
    read_manifest,
    trainable_records,
    validate_records,
)
from vidpo.evaluation.evaluate import evaluate_model, paired_delta
from vidpo.evaluation.pair_viewer import write_pair_viewer
from vidpo.objectives.preference import PreferenceObjective, implicit_accuracy
from vidpo.stages.common import save_samples, setup_logging, write_run_report
from vidpo.stages.decode import decode_pairs
from vidpo.stages.generate import ShardSlice, check_generate_settings, generate_pairs
from vidpo.stages.judged_eval import judged_evaluation
from vidpo.stages.label import check_label_settings, label_pairs
from vidpo.stages.parts import RunParts, latent_frames_of, prepare_run
from vidpo.training.export import export_run
from vidpo.training.modeling import (
    build_world,
    load_initial_policy,
    pick_device,
    run_segment_ids,
    set_threads,
)
from vidpo.training.policy import prepare_parallel_policy, prepare_policy, prepare_sampling_policy, start_distributed
from vidpo.training.trainer import Trainer
from vidpo.utils import atomic
from vidpo.utils.lock import LOCK_FILE, output_lock
from vidpo.utils.seeding import seed_everything

log = logging.getLogger("vidpo")


def load_pairs(cfg: RunConfig, pairs_dir: str | Path, num_segments: int) -> tuple[list[PairRecord], ShardReader, list[str]]:
    pairs_dir = Path(pairs_dir)
    records, problems = read_manifest(pairs_dir / MANIFEST_FILE, need_labels=True, on_error=cfg.pref.on_bad_pair,
                                      num_segments=num_segments)
    reader = ShardReader(pairs_dir)
    records, more = validate_records(records, reader, cfg.pref.on_bad_pair)
    return records, reader, problems + more


_START = object()   # train_preference starts the process groups itself unless given a context (or None)


def dense_pairs_only(cfg: RunConfig, records: list[PairRecord]) -> tuple[list[PairRecord], int]:
    """DenseDPO's data rule (``label.min_non_tie_fraction``): with objective dense_dpo, only the pairs with more
    than that fraction of their judged (not failed) segments are non-ties. Returns the kept records and how many
    were dropped."""
    fraction = cfg.label.min_non_tie_fraction
    if cfg.train.objective != "dense_dpo" or fraction is None:
        return records, 0
    kept = [r for r in records if sum(v != 0 for v in r.labels) > fraction * r.judged_segments()]
    return kept, len(records) - len(kept)


def train_preference(cfg: RunConfig, run_dir: str | Path, *, resume: bool = True,
                     reference_weights: Optional[Path] = None, parts: Optional[RunParts] = None,
                     parallel=_START) -> dict:
    """Train the policy on the labelled pairs of ``pref.pairs`` into ``run_dir`` (checkpoints, metrics, the LoRA
    export); ``reference_weights`` gives the frozen reference other weights than the initial policy's.
    ``parts`` (the run's domain, conditioning, VAE and real clips) defaults to ``prepare_run``'s; ``parallel``
    is the run's ParallelContext when the caller has started the process groups (None: one process).
    Holds ``run_dir``'s lock (vidpo.utils.lock) while it trains."""
    with output_lock(run_dir):
        return _train_preference(cfg, Path(run_dir), resume=resume, reference_weights=reference_weights,
                                 parts=parts, parallel=parallel)


def _train_preference(cfg: RunConfig, run_dir: Path, *, resume: bool, reference_weights: Optional[Path],
                      parts: Optional[RunParts], parallel) -> dict:
    if not cfg.pref.pairs:
        raise ConfigError("pref.pairs must name a labelled pairs directory (manifest.jsonl + shards); "
                          "`vidpo run` sets it for you")
    set_threads(cfg)
    seed_everything(cfg.seed)
    world = parts.domain.world if parts is not None and isinstance(parts.domain, ShapesDomain) else None
    if world is None and not cfg.prompts.path:
        world = build_world(cfg)
    if parallel is _START:
        parallel = start_distributed(cfg, world, latent_frames_of(cfg))   # None for one process
    device = parallel.device if parallel is not None else pick_device()
    parts = parts if parts is not None else prepare_run(cfg, run_dir, device=device)
    seg = run_segment_ids(cfg, parts.domain, parts.vae)
    records, reader, problems = load_pairs(cfg, resolve_path(cfg.pref.pairs), int(seg.max()) + 1)
    # refuses a manifest without a non-tie label; failed comparisons are masked, never ties (vidpo.data.pairs)
    records, _ = trainable_records(records, resolve_path(cfg.pref.pairs))
    records, too_few_non_ties = dense_pairs_only(cfg, records)
    if parallel is None:
        model, reference, ref_mode, lora_state = prepare_policy(cfg, world, device, reference_weights)
    else:
        model, reference, ref_mode, lora_state = prepare_parallel_policy(cfg, world, parallel, reference_weights)
    log.info("train[%s]: %d pairs (%d skipped, %d with too few non-tie segments), reference=%s, loss backend=%s",
             cfg.train.objective, len(records), len(problems), too_few_non_ties, ref_mode, cfg.pref.loss_backend)
    # a diffusers adapter brings its own forward process / target / timesteps (None: rectified flow).
    process = model if getattr(model, "training_target", None) is not None else None
    objective = PreferenceObjective(cfg, parts.conditioning, device, records, reader, seg, reference,
                                    parallel=parallel, process=process, real_latents=parts.real_latents_of_records)
    evaluate = None
    if world is not None and cfg.train.eval_every > 0:   # the toy world's exact oracle scores samples in training
        oracle = exact_oracle(world)

        def evaluate(m, step):
            return evaluate_model(m, cfg, world, oracle, num_samples=max(16, cfg.eval.num_samples // 2)).flat()

    # Multi-process runs: every rank runs the evaluation on the same seeds (the model's FSDP / TP / CP
    # collectives need every rank in each forward; CP samplers gather the frames) and rank 0 logs it.
    if parallel is None or parallel.is_main:
        atomic.write_text(run_dir / "config.yaml", to_yaml(cfg))
    trainer = Trainer(cfg, run_dir, model, objective, device=device, resume=resume, lora_state=lora_state,
                      evaluate=evaluate, parallel=parallel)
    result = trainer.fit()
    if parallel is None or parallel.is_main:   # OUT/lora, or a diffusers model's OUT/transformer (full fine-tune)
        export_run(cfg, run_dir, model, from_checkpoint=parallel is not None)
    result.update({"pairs": len(records), "skipped_pairs": len(problems), "reference": ref_mode})
    if cfg.train.objective == "dense_dpo" and cfg.label.min_non_tie_fraction is not None:
        result["pairs_with_too_few_non_ties"] = too_few_non_ties
    return {"model": model, "reference": reference, "records": records, "reader": reader, "result": result,
            "world": world, "segment_ids": seg, "parts": parts}


# ----- run: the whole chain ----------------------------------------------------------------------------
def generate_and_decode(cfg: RunConfig, pairs_dir: Path, parts: RunParts, *, split: str = "train",
                        resume: bool = True, rank: int = 0, world_size: int = 1, overwrite: bool = False,
                        parallel=None) -> None:
    """``vidpo generate``: the pairs of ``split`` into ``pairs_dir`` (kept when there with ``resume``, if made with
    the same settings; ``overwrite`` starts the folder over), and, for a latent model, decoded to frames and mp4s
    with the pair viewer (people and judges look at pixels). Rank 0 holds the folder's lock meanwhile. Under a
    model-parallel layout of ``parallel`` (TP / CP) the policy samples split over each data-parallel group, as in
    training (``prepare_sampling_policy``)."""
    pairs_dir = Path(pairs_dir)
    with output_lock(pairs_dir, rank=rank if world_size > 1 else None):   # None: $RANK
        if overwrite or not resume or not (pairs_dir / PAIRS_FILE).exists():
            policy = prepare_sampling_policy(cfg, getattr(parts.domain, "world", None), parallel)
            generate_pairs(cfg, pairs_dir, split=split, domain=parts.domain, conditioning=parts.conditioning,
                           vae=parts.vae, real_latents=parts.real_latents, rank=rank, world_size=world_size,
                           overwrite=overwrite, policy=policy,
                           shards=ShardSlice.of(parallel, rank, world_size, model_parallel=policy is not None))
        elif rank == 0:   # kept pairs: only if the settings asked for now made them
            check_generate_settings(cfg, pairs_dir, parts.domain, split)
        if not parts.vae.pixel_space:
            decode_pairs(pairs_dir, parts.vae, parts.domain.fps, batch_size=cfg.generate.decode_batch_size,
                         progress=cfg.train.progress, rank=rank, world_size=world_size)
            if rank == 0:
                write_pair_viewer(pairs_dir, None, cfg.label.segment_seconds, parts.domain.fps,
                                  temporal_compression=parts.vae.temporal_compression)


def generate_stage(cfg: RunConfig, pairs_dir: str | Path, *, split: str = "train", overwrite: bool = False) -> None:
    """``vidpo generate`` on its own, in one process or under torchrun: the shards (and their decoding) are sliced
    over the ranks as in ``vidpo run``, so the folder equals one process's; prompt embeddings go beside it."""
    pairs_dir = Path(pairs_dir)
    world = None if cfg.prompts.path else build_world(cfg)
    parallel = start_distributed(cfg, world, latent_frames_of(cfg))   # None for one process
    rank, ranks = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    parts = prepare_run(cfg, pairs_dir.parent, device=parallel.device if parallel is not None else None, rank=rank,
                        world_size=ranks)
    generate_and_decode(cfg, pairs_dir, parts, split=split, resume=False, rank=rank, world_size=ranks,
                        overwrite=overwrite, parallel=parallel)
    _barrier(ranks)


def label_stage(cfg: RunConfig, pairs_dir: str | Path, *, overwrite: bool = False) -> Optional[dict]:
    """``vidpo label`` on its own, in one process or under torchrun: each rank labels its share of the batches
    (a critic on its own GPU, a VLM's requests shared out) and rank 0 writes the manifest, as one process would;
    returns the label statistics on rank 0, None on the others."""
    world = None if cfg.prompts.path else build_world(cfg)
    parallel = start_distributed(cfg, world, latent_frames_of(cfg))   # None for one process
    rank, ranks = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    return label_pairs(cfg, pairs_dir, overwrite=overwrite, rank=rank, world_size=ranks)


def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True, overwrite: bool = False) -> dict:
    """``vidpo run``: prepare the run's parts (prompt embeddings, VAE, real clips), then for the training and the
    held-out pairs generate -> decode (a latent model's pairs become mp4s, frames and the pair viewer) -> label;
    train; evaluate (the toy world's oracle; the judged evaluation on held-out prompts); summary and report.

    The run holds the lock of ``out_dir`` throughout, and that of each pairs folder from its generation on;
    ``overwrite`` first empties ``out_dir`` (a run started over with other settings)."""
    out_dir = Path(out_dir)
    with output_lock(out_dir), contextlib.ExitStack() as held:
        if overwrite and (out_dir / "config.yaml").exists():
            pairs = [out_dir / sub for sub in ("pairs", "pairs_heldout") if (out_dir / sub).is_dir()]
            for d in pairs:   # held, and their lock files kept: a deleted one could be locked anew by another run
                held.enter_context(output_lock(d))
            removed = atomic.clear_folder(out_dir, keep=(LOCK_FILE, "vidpo.log", *(d.name for d in pairs)))
            removed += sum(atomic.clear_folder(d, keep=(LOCK_FILE,)) for d in pairs)
            log.info("run: --overwrite: removed %d entries of %s", removed, out_dir)
        return _run_pipeline(cfg, out_dir, resume=resume, held=held)


def _run_pipeline(cfg: RunConfig, out_dir: Path, *, resume: bool, held: contextlib.ExitStack) -> dict:


    setup_logging(out_dir)
    t0 = time.time()
    timings = {}
    pairs_dir, heldout_dir = out_dir / "pairs", out_dir / "pairs_heldout"
    cfg = copy.deepcopy(cfg)
    cfg.pref.pairs = str(pairs_dir.resolve())
    atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    t = time.time()
    world = None if cfg.prompts.path else build_world(cfg)
    parallel = start_distributed(cfg, world, latent_frames_of(cfg))   # under torchrun: every stage is sliced
    rank, ranks = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    parts = prepare_run(cfg, out_dir, device=parallel.device if parallel is not None else None, rank=rank,
                        world_size=ranks)
    domain = parts.domain
    timings["prepare_s"] = round(time.time() - t, 1)
    for split, d, n in (("train", pairs_dir, cfg.generate.num_pairs), ("heldout", heldout_dir, cfg.generate.heldout_pairs)):
        if n <= 0:
            continue
        t = time.time()
        held.enter_context(output_lock(d, rank=rank if ranks > 1 else None))   # until the run ends (labels too)
        generate_and_decode(cfg, d, parts, split=split, resume=resume, rank=rank, world_size=ranks, parallel=parallel)
        if not (d / MANIFEST_FILE).exists() or not resume:
            label_pairs(cfg, d, domain=domain, rank=rank, world_size=ranks)   # each rank labels its batches
        elif rank == 0:
            check_label_settings(cfg, d)         # kept labels: only if the label settings asked for now made them
        _barrier(ranks)
        timings[f"pairs_{split}_s"] = round(time.time() - t, 1)
    t = time.time()
    trained = train_preference(cfg, out_dir, resume=resume, parts=parts, parallel=parallel)
    timings["train_s"] = round(time.time() - t, 1)

    # Evaluation: every rank samples (a sharded policy needs all of them in each forward), rank 0 writes.
    t = time.time()
    world, model = trained["world"], trained["model"]
    device = parallel.device if parallel is not None else pick_device()
    base = load_initial_policy(cfg, world, device)
    summary = {"objective": cfg.train.objective, "generate_mode": cfg.generate.mode, "seed": cfg.seed}
    if world is not None:
        summary.update(_oracle_evaluation(cfg, out_dir, world, base, model, write=rank == 0))
    judged = judged_evaluation(cfg, out_dir, base=base, policy=model, domain=domain, conditioning=parts.conditioning,
                               vae=parts.vae, write=rank == 0, parallel=parallel)
    if judged is not None:
        summary["judged"] = judged
    acc_args = dict(beta=cfg.pref.beta, seed=cfg.seed, t_min=cfg.flow.t_min, t_max=cfg.flow.t_max, device=device,
                    backend=cfg.pref.loss_backend, dense=cfg.train.objective == "dense_dpo")
    seg = trained["segment_ids"]
    # A tensor- or context-parallel policy returns its own shards of heads or frames: implicit accuracy is
    # measured with whole outputs only (one process, or data parallel).
    whole = parallel is None or parallel.tp * parallel.cp == 1
    acc_train = implicit_accuracy(model, trained["reference"], parts.conditioning, trained["records"][:256],
                                  trained["reader"], seg, **acc_args) if whole else None
    acc_heldout = None
    if cfg.generate.heldout_pairs > 0 and whole:
        held, held_reader, _ = load_pairs(cfg, heldout_dir, int(seg.max()) + 1)
        acc_heldout = implicit_accuracy(model, trained["reference"], parts.conditioning, held, held_reader, seg,
                                        **acc_args)
    timings["eval_s"] = round(time.time() - t, 1)
    summary.update({
        "implicit_accuracy": {"train": acc_train, "heldout": acc_heldout},
        "labels": json.loads((pairs_dir / "label.json").read_text()) if (pairs_dir / "label.json").exists() else None,
        "train": {k: v for k, v in trained["result"].items() if k not in ("last", "eval")},
        "timings": dict(timings, total_s=round(time.time() - t0, 1)),
    })
    if summary["labels"]:
        summary["labels"].pop("problems", None)
    if rank == 0:
        atomic.write_json(out_dir / "summary.json", summary)
        write_run_report(out_dir)
    _barrier(ranks)
    return summary


def _barrier(ranks: int) -> None:
    if ranks > 1:
        dist.barrier()


def _oracle_evaluation(cfg: RunConfig, out_dir: Path, world, base, model, *, write: bool = True) -> dict:
    """The toy world's evaluation: both models' samples on the evaluation seeds scored by the exact oracle
    (paired deltas per component and bad mode, win rate), with sample grids."""
    oracle = exact_oracle(world)
    base_eval = evaluate_model(base, cfg, world, oracle)
    final_eval = evaluate_model(model, cfg, world, oracle)
    if write:
        save_samples(base_eval, world, out_dir / "samples", "base", cfg.eval.grid_conditions)
        save_samples(final_eval, world, out_dir / "samples", "final", cfg.eval.grid_conditions)
    delta = paired_delta(final_eval, base_eval)
    base_s, final_s = base_eval.summary(), final_eval.summary()
    log.info("oracle: base %.4f -> final %.4f, delta %.4f [%.4f, %.4f]", base_s["oracle"]["mean"],
             final_s["oracle"]["mean"], delta["oracle"]["mean"], *delta["oracle"]["ci95"])
    return {
        "oracle": {"base": base_s["oracle"], "final": final_s["oracle"], "delta": delta["oracle"]},
        "components": {name.split("/", 1)[1]: {"base": base_s[name]["mean"], "final": final_s[name]["mean"],
                                               "delta": delta[name]["mean"], "delta_ci95": delta[name]["ci95"]}
                       for name in base_s if name.startswith("oracle/")},
        # Bad-mode rates (the oracle's failure_modes): did the run remove backwards / static / wrong-colour clips?
        "modes": {name.split("/", 1)[1]: {"base": base_s[name]["mean"], "final": final_s[name]["mean"],
                                          "delta": delta[name]["mean"], "delta_ci95": delta[name]["ci95"]}
                  for name in base_s if name.startswith("mode/") and name in delta},
        "win_rate": delta["win_rate"],
    }
