"""The preference pipeline: ``generate -> label -> train -> eval -> report`` (``vidpo run``).

Each stage is a CLI verb and a function, and each is resumable:
  * generate: shards are written atomically one by one; a rerun skips complete shards;
  * label:    labelled pairs are appended to ``labels.partial.jsonl`` batch by batch, so a rerun (after a kill,
              or a VLM server outage) labels only what is left; ``manifest.jsonl`` is written at the end;
  * train:    checkpoints + exact resume (``vidpo.trainer``);
  * eval/report: recomputed from the saved weights.

``vidpo run RECIPE --out DIR`` puts pairs in ``DIR/pairs`` (and ``DIR/pairs_heldout``), the training run
(checkpoints, metrics.jsonl) in ``DIR`` itself, and writes ``DIR/summary.json`` and ``DIR/report.html``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from vidpo import atomic
from vidpo import checkpoint as ckpt
from vidpo.config import RunConfig
from vidpo.data.pairs import (MANIFEST_FILE, PAIRS_FILE, PairDataError, PairRecord, ShardReader, read_manifest,
                              shard_name, validate_records, write_manifest)
from vidpo.evaluate import evaluate_model, paired_delta
from vidpo.models import flow
from vidpo.models.sampling import has_sampler_hook
from vidpo.modeling import build_policy, build_world, pick_device, set_threads
from vidpo.recipe import ConfigError, resolve_path, to_yaml
from vidpo.seeding import generator, seed_everything
from vidpo.segments import segment_ids as make_segment_ids

log = logging.getLogger("vidpo")


def run_segment_ids(cfg: RunConfig) -> torch.Tensor:
    """The (T,) segment id of each latent frame for this recipe's world and label settings."""
    return make_segment_ids(cfg.world.frames, cfg.world.fps, cfg.label.segment_seconds,
                            cfg.label.temporal_compression)


def _require_init(cfg: RunConfig) -> Path:
    if not cfg.train.init_from:
        raise ConfigError("train.init_from must name the policy to start from (e.g. recipes/shapes/base)")
    return resolve_path(cfg.train.init_from)


def load_initial_policy(cfg: RunConfig, world, device) -> torch.nn.Module:
    model = build_policy(cfg, world, device)
    if cfg.model.kind != "dit" and not cfg.train.init_from:
        return model  # issue 8: a diffusers model directory (model.path) already holds the weights
    ckpt.load_weights(model, _require_init(cfg))
    return model


# ----- generate ---------------------------------------------------------------------------------------
def generate_pairs(cfg: RunConfig, pairs_dir: str | Path, *, split: str = "train",
                   policy: Optional[torch.nn.Module] = None) -> dict:
    """Sample ``generate.num_pairs`` (or ``heldout_pairs`` for split 'heldout') pairs into shards."""
    pairs_dir = Path(pairs_dir)
    atomic.clean_leftovers(pairs_dir / "shards")
    n = cfg.generate.num_pairs if split == "train" else cfg.generate.heldout_pairs
    world = build_world(cfg)
    device = pick_device()
    model = policy if policy is not None else load_initial_policy(cfg, world, device)
    model.eval()
    dtype = next(model.parameters()).dtype
    order = torch.randperm(world.num_conditions, generator=generator(cfg.seed, "gen-cond", split))
    gen = cfg.generate
    shape = (3, cfg.world.frames, cfg.world.height, cfg.world.width)
    records: list[PairRecord] = []
    written = skipped = 0

    def velocity(x, t, c):
        return model(x.to(dtype), t.to(dtype), c).float()

    num_shards = (n + gen.shard_size - 1) // gen.shard_size
    for k in tqdm(range(num_shards), desc=f"generate[{split}]", disable=not cfg.train.progress, leave=False):
        idx = list(range(k * gen.shard_size, min(n, (k + 1) * gen.shard_size)))
        cond_ids = world.condition(order[torch.tensor(idx) % world.num_conditions])
        name = shard_name(k)
        etas = None
        if gen.mode == "structural":
            etas = gen.eta_min + (gen.eta_max - gen.eta_min) * torch.rand(len(idx), generator=generator(
                cfg.seed, "gen-eta", split, k))
        path = pairs_dir / name
        if _shard_complete(path, len(idx)):
            skipped += 1
        else:
            tokens = world.tokens(cond_ids).to(device)
            null = model.null_condition(tokens)
            common = dict(null_cond=null, cfg_scale=gen.cfg_scale, steps=gen.steps, seed=cfg.seed)
            tensors = {"cond_ids": cond_ids}
            # Issue 8: a policy with a sampler hook (diffusers adapter) samples and SDEdits with its own
            # scheduler (flow-match Euler / UniPC for Wan, DDIM / DPM for CogVideoX); the toy DiT with Euler.
            hook = has_sampler_hook(model)
            if gen.mode == "vanilla":
                for key, stream in (("first", f"{split}-pair-a"), ("second", f"{split}-pair-b")):
                    if hook:
                        x = model.sample(tokens, shape, indices=idx, stream=stream, **common)
                    else:
                        x = flow.sample(velocity, (len(idx),) + shape, tokens, indices=idx, stream=stream,
                                        device=device, **common)
                    tensors[key] = x.float().clamp(-1, 1).cpu()
            else:
                gt = world.render(cond_ids, generator(cfg.seed, "gen-gt", split, k), corrupt=False).clips.to(device)
                tensors["gt"] = gt.cpu()
                tensors["eta"] = etas
                for key, stream in (("first", f"{split}-sdedit-a"), ("second", f"{split}-sdedit-b")):
                    sdedit = model.sdedit if hook else partial(flow.sdedit, velocity)
                    tensors[key] = sdedit(gt, tokens, etas.to(device), indices=idx, stream=stream,
                                          **common).float().clamp(-1, 1).cpu()
            atomic.save_safetensors(tensors, path, metadata={"mode": gen.mode, "split": split})
            written += 1
        captions = world.captions(cond_ids)
        for row, i in enumerate(idx):
            records.append(PairRecord(pair_id=f"{split}-{i:06d}", shard=name, row=row,
                                      cond_ids=[int(v) for v in cond_ids[row]], caption=captions[row], mode=gen.mode,
                                      eta=None if etas is None else round(float(etas[row]), 6)))
    write_manifest(pairs_dir / PAIRS_FILE, records)
    info = {"pairs": n, "shards_written": written, "shards_skipped": skipped, "mode": gen.mode, "split": split}
    atomic.write_json(pairs_dir / "generate.json", info)
    log.info("generate[%s]: %d pairs, %d shards written, %d already complete", split, n, written, skipped)
    return info


def _shard_complete(path: Path, rows: int) -> bool:
    if not path.exists():
        return False
    try:
        tensors = ShardReader(path.parent.parent).shard(str(path.relative_to(path.parent.parent)))
    except PairDataError as exc:
        log.warning("%s; regenerating it", exc)
        return False
    return all(k in tensors and tensors[k].shape[0] == rows for k in ("first", "second"))


# ----- label ------------------------------------------------------------------------------------------
def build_run_labeler(cfg: RunConfig, world):
    from vidpo.labeling import build_labeler

    kind = cfg.label.labeler
    if kind == "oracle":
        return build_labeler("oracle", world=world, tie_margin=cfg.label.tie_margin, mode=cfg.label.granularity)
    if kind == "human":
        if not cfg.label.human_file:
            raise ConfigError("label.labeler=human needs label.human_file (a JSONL of per-pair labels)")
        return build_labeler("human", path=str(resolve_path(cfg.label.human_file)), on_missing=cfg.label.on_error,
                             on_error=cfg.label.on_error)
    if kind == "vlm":
        if cfg.label.vlm is None:
            raise ConfigError("label.labeler=vlm needs a label.vlm section (base_url, model, ...)")
        return build_labeler("vlm", config=dataclasses.replace(cfg.label.vlm, on_error=cfg.label.on_error))
    return build_labeler(kind, cfg=cfg, world=world)


def label_pairs(cfg: RunConfig, pairs_dir: str | Path, *, batch_size: int = 64) -> dict:
    """Label every pair of ``pairs_dir/pairs.jsonl`` per segment; write ``manifest.jsonl``."""
    from vidpo.labeling import PairBatch

    pairs_dir = Path(pairs_dir)
    records, problems = read_manifest(pairs_dir / PAIRS_FILE, need_labels=False, on_error=cfg.pref.on_bad_pair)
    reader = ShardReader(pairs_dir)
    records, shard_problems = validate_records(records, reader, cfg.pref.on_bad_pair)
    problems += shard_problems
    world = build_world(cfg)
    labeler = build_run_labeler(cfg, world)
    seg = run_segment_ids(cfg)
    partial_path = pairs_dir / "labels.partial.jsonl"
    done: dict[str, dict] = {}
    if partial_path.exists():
        for line in partial_path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["pair_id"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: that pair is labelled again
    todo = [r for r in records if r.pair_id not in done]
    failed = 0
    messages: list[str] = []
    with open(partial_path, "a") as fh:
        for start in tqdm(range(0, len(todo), batch_size), desc="label", disable=not cfg.train.progress, leave=False):
            recs = todo[start:start + batch_size]
            batch = PairBatch(first=torch.stack([reader.get(r, "first") for r in recs]).float(),
                              second=torch.stack([reader.get(r, "second") for r in recs]).float(),
                              captions=[r.caption for r in recs], pair_ids=[r.pair_id for r in recs],
                              segment_ids=seg, cond_ids=torch.tensor([r.cond_ids for r in recs]), fps=cfg.world.fps)
            result = labeler.label(batch)
            failed += result.failed
            messages += result.messages
            for i, r in enumerate(recs):
                row = {"pair_id": r.pair_id, "labels": [int(v) for v in result.labels[i]],
                       "video_label": int(result.video_labels[i])}
                done[r.pair_id] = row
                fh.write(json.dumps(row) + "\n")
            fh.flush()
    labelled = []
    for r in records:
        row = done[r.pair_id]
        r.labels, r.video_label = row["labels"], row["video_label"]
        r.segment_seconds, r.label_source = cfg.label.segment_seconds, cfg.label.labeler
        labelled.append(r)
    write_manifest(pairs_dir / MANIFEST_FILE, labelled)
    partial_path.unlink(missing_ok=True)
    all_labels = torch.tensor([r.labels for r in labelled]) if labelled else torch.zeros(0, 1)
    stats = {"pairs": len(labelled), "segments": int(seg.max()) + 1, "labeler": cfg.label.labeler,
             "tie_fraction": float((all_labels == 0).double().mean()) if labelled else None,
             "first_better_fraction": float((all_labels > 0).double().mean()) if labelled else None,
             "failed_comparisons": failed, "skipped_pairs": len(problems), "problems": (problems + messages)[:50]}
    atomic.write_json(pairs_dir / "label.json", stats)
    log.info("label: %d pairs, %d segments each, tie fraction %.3f, %d failed comparisons, %d pairs skipped",
             stats["pairs"], stats["segments"], stats["tie_fraction"] or 0.0, failed, len(problems))
    return stats


# ----- train ------------------------------------------------------------------------------------------
def reference_mode(cfg: RunConfig) -> str:
    """'lora_disabled' or 'frozen_copy' (pref.reference with 'auto' resolved)."""
    mode = cfg.pref.reference
    if mode == "auto":
        mode = "lora_disabled" if cfg.lora is not None else "frozen_copy"
    return mode


def make_reference(cfg: RunConfig, model: torch.nn.Module):
    """The reference forward: the policy with LoRA disabled (no weight copy), or a frozen copy."""
    mode = reference_mode(cfg)
    if mode == "lora_disabled":
        if cfg.lora is None:
            raise ConfigError("pref.reference=lora_disabled needs LoRA (set a lora section, e.g. --set lora.rank=8)")
        from vidpo.models.lora import lora_disabled

        def reference(x, t, c):
            with torch.no_grad(), lora_disabled(model):
                return model(x, t, c)
        return reference, mode
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def reference(x, t, c):
        with torch.no_grad():
            return frozen(x, t, c)
    return reference, mode


def prepare_policy(cfg: RunConfig, world, device):
    """Initial policy (+ LoRA adapters, trainable) and its reference forward."""
    model = load_initial_policy(cfg, world, device)
    lora_state = None
    if cfg.lora is not None:
        from vidpo.models.lora import apply_lora, lora_state_dict, mark_only_lora_trainable

        apply_lora(model, cfg.lora)
        mark_only_lora_trainable(model)

        def lora_state():
            return lora_state_dict(model), {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                                            "target_modules": json.dumps(cfg.lora.target_modules)}
    reference, mode = make_reference(cfg, model)
    return model, reference, mode, lora_state


def prepare_parallel_policy(cfg: RunConfig, world, parallel):
    """``prepare_policy`` for a multi-process run: the policy (and a frozen reference copy, when that is the
    reference) parallelized over ``parallel`` (TP/SP -> CP -> checkpointing -> compile -> FSDP) by the model's
    own parallelize function (``models/<name>/parallelize.py``)."""
    if cfg.model.kind == "dit":
        from vidpo.models.dit.parallelize import parallelize_dit as parallelize
    elif cfg.model.kind == "wan":
        from vidpo.models.wan.parallelize import parallelize_wan as parallelize
    elif cfg.model.kind == "cogvideox":
        from vidpo.models.cogvideox.parallelize import parallelize_cogvideox as parallelize
    else:
        raise ConfigError(f"parallel layouts (torchrun with more than one process) are implemented for model.kind "
                          f"'dit', 'wan' and 'cogvideox'; '{cfg.model.kind}' trains in one process: start it "
                          "without torchrun")

    full = load_initial_policy(cfg, world, parallel.device)
    mode = reference_mode(cfg)
    lora_state = None
    if cfg.lora is not None:
        if parallel.tp > 1:
            raise ConfigError("LoRA adapters are not tensor-parallel: use parallel.tp=1 (context / data parallel "
                              "work with LoRA) or full fine-tuning with pref.reference=frozen_copy")
        from vidpo.models.lora import apply_lora, mark_only_lora_trainable

        apply_lora(full, cfg.lora)
        mark_only_lora_trainable(full)
        meta = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": json.dumps(cfg.lora.target_modules)}

        def lora_state():
            return {}, meta  # the distributed checkpoint writes the adapters from the consolidated weights
    if mode == "lora_disabled" and cfg.lora is None:
        raise ConfigError("pref.reference=lora_disabled needs LoRA (set a lora section, e.g. --set lora.rank=8)")
    frozen = copy.deepcopy(full).eval().requires_grad_(False) if mode == "frozen_copy" else None
    model = parallelize(full, parallel, activation_checkpointing=cfg.parallel.activation_checkpointing,
                        compile=cfg.parallel.compile)
    if frozen is not None:
        frozen_parallel = parallelize(frozen, parallel, compile=cfg.parallel.compile).eval()

        def reference(x, t, c):
            with torch.no_grad():
                return frozen_parallel(x, t, c)
    else:
        from vidpo.models.lora import lora_disabled

        def reference(x, t, c):
            with torch.no_grad(), lora_disabled(model):
                return model(x, t, c)
    return model, reference, mode, lora_state


def _heads_and_temporal_patch(cfg: RunConfig, world) -> tuple[int, int]:
    """Attention heads and temporal patch size of the run's model (what a parallel layout must divide)."""
    if cfg.model.kind == "dit":
        from vidpo.modeling import dit_config_for

        dcfg = dit_config_for(cfg, world)
        return dcfg.num_heads, dcfg.patch_size[0]
    from vidpo.models.adapters import transformer_dir

    if not cfg.model.path:
        raise ConfigError(f"model.kind is '{cfg.model.kind}' but 'model.path' (the local model directory) is not set")
    info = json.loads((transformer_dir(resolve_path(cfg.model.path)) / "config.json").read_text())
    patch = info.get("patch_size")
    temporal = patch[0] if isinstance(patch, (list, tuple)) else (info.get("patch_size_t") or 1)
    return int(info["num_attention_heads"]), int(temporal)


def start_distributed(cfg: RunConfig, world):
    """The run's ParallelContext under torchrun (None for one process), checked against the model."""
    from vidpo.distributed import DistributedSetupError, init_distributed

    heads, temporal_patch = _heads_and_temporal_patch(cfg, world)
    try:
        return init_distributed(cfg.parallel, num_heads=heads, seed=cfg.seed,
                                frames=cfg.world.frames // temporal_patch)
    except DistributedSetupError as exc:
        raise ConfigError(f"parallel: {exc}") from None


def load_pairs(cfg: RunConfig, pairs_dir: str | Path, num_segments: int) -> tuple[list[PairRecord], ShardReader, list[str]]:
    pairs_dir = Path(pairs_dir)
    records, problems = read_manifest(pairs_dir / MANIFEST_FILE, need_labels=True, on_error=cfg.pref.on_bad_pair,
                                      num_segments=num_segments)
    reader = ShardReader(pairs_dir)
    records, more = validate_records(records, reader, cfg.pref.on_bad_pair)
    return records, reader, problems + more


def train_preference(cfg: RunConfig, run_dir: str | Path, *, resume: bool = True) -> dict:
    from vidpo.data.oracle import ShapesOracle
    from vidpo.objectives.preference import PreferenceObjective
    from vidpo.trainer import Trainer

    run_dir = Path(run_dir)
    if not cfg.pref.pairs:
        raise ConfigError("pref.pairs must name a labelled pairs directory (manifest.jsonl + shards); "
                          "`vidpo run` sets it for you")
    set_threads(cfg)
    seed_everything(cfg.seed)
    world = build_world(cfg)
    parallel = start_distributed(cfg, world)   # None for one process
    device = parallel.device if parallel is not None else pick_device()
    seg = run_segment_ids(cfg)
    records, reader, problems = load_pairs(cfg, resolve_path(cfg.pref.pairs), int(seg.max()) + 1)
    if parallel is None:
        model, reference, ref_mode, lora_state = prepare_policy(cfg, world, device)
    else:
        model, reference, ref_mode, lora_state = prepare_parallel_policy(cfg, world, parallel)
    log.info("train[%s]: %d pairs (%d skipped), reference=%s, loss backend=%s", cfg.train.objective, len(records),
             len(problems), ref_mode, cfg.pref.loss_backend)
    # Issue 8: a diffusers adapter brings its own forward process / target / timesteps (None: rectified flow).
    process = model if getattr(model, "training_target", None) is not None else None
    objective = PreferenceObjective(cfg, world, device, records, reader, seg, reference, parallel=parallel,
                                    process=process)
    oracle = ShapesOracle(world)

    def evaluate(m, step):
        return evaluate_model(m, cfg, world, oracle, num_samples=max(16, cfg.eval.num_samples // 2)).flat()

    # Multi-process runs: every rank runs the evaluation on the same seeds (the model's FSDP / TP / CP
    # collectives need every rank in each forward; CP samplers gather the frames) and rank 0 logs it.
    if parallel is None or parallel.is_main:
        atomic.write_text(run_dir / "config.yaml", to_yaml(cfg))
    trainer = Trainer(cfg, run_dir, model, objective, device=device, resume=resume, lora_state=lora_state,
                      evaluate=evaluate if cfg.train.eval_every > 0 else None, parallel=parallel)
    result = trainer.fit()
    if cfg.lora is not None and parallel is None:
        from vidpo.models.lora import save_lora

        if hasattr(model, "export_lora"):  # issue 8: diffusers' format, loadable by pipe.load_lora_weights
            model.export_lora(run_dir / "lora.safetensors")
        else:
            save_lora(model, str(run_dir / "lora.safetensors"))
    elif cfg.lora is not None and parallel.is_main:
        latest = ckpt.latest_checkpoint(run_dir)
        atomic.write_bytes(run_dir / "lora.safetensors", (latest / "lora.safetensors").read_bytes())
    result.update({"pairs": len(records), "skipped_pairs": len(problems), "reference": ref_mode})
    return {"model": model, "reference": reference, "records": records, "reader": reader, "result": result,
            "world": world, "segment_ids": seg}


# ----- run: the whole chain ----------------------------------------------------------------------------
def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    from vidpo.data.oracle import ShapesOracle
    from vidpo.jobs import save_samples, setup_logging
    from vidpo.objectives.preference import implicit_accuracy

    out_dir = Path(out_dir)
    setup_logging(out_dir)
    t0 = time.time()
    timings = {}
    pairs_dir, heldout_dir = out_dir / "pairs", out_dir / "pairs_heldout"
    cfg = copy.deepcopy(cfg)
    cfg.pref.pairs = str(pairs_dir.resolve())
    atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    for split, d, n in (("train", pairs_dir, cfg.generate.num_pairs), ("heldout", heldout_dir, cfg.generate.heldout_pairs)):
        if n <= 0:
            continue
        t = time.time()
        if not (d / PAIRS_FILE).exists() or not resume:
            generate_pairs(cfg, d, split=split)
        if not (d / MANIFEST_FILE).exists() or not resume:
            label_pairs(cfg, d)
        timings[f"pairs_{split}_s"] = round(time.time() - t, 1)
    t = time.time()
    trained = train_preference(cfg, out_dir, resume=resume)
    timings["train_s"] = round(time.time() - t, 1)

    t = time.time()
    world, model, device = trained["world"], trained["model"], pick_device()
    oracle = ShapesOracle(world)
    base = load_initial_policy(cfg, world, device)
    base_eval = evaluate_model(base, cfg, world, oracle)
    final_eval = evaluate_model(model, cfg, world, oracle)
    save_samples(base_eval, world, out_dir / "samples", "base", cfg.eval.grid_conditions)
    save_samples(final_eval, world, out_dir / "samples", "final", cfg.eval.grid_conditions)
    delta = paired_delta(final_eval, base_eval)
    acc_args = dict(beta=cfg.pref.beta, seed=cfg.seed, t_min=cfg.flow.t_min, t_max=cfg.flow.t_max, device=device,
                    backend=cfg.pref.loss_backend, dense=cfg.train.objective == "dense_dpo")
    seg = trained["segment_ids"]
    acc_train = implicit_accuracy(model, trained["reference"], world, trained["records"][:256], trained["reader"],
                                  seg, **acc_args)
    acc_heldout = None
    if cfg.generate.heldout_pairs > 0:
        held, held_reader, _ = load_pairs(cfg, heldout_dir, int(seg.max()) + 1)
        acc_heldout = implicit_accuracy(model, trained["reference"], world, held, held_reader, seg, **acc_args)
    timings["eval_s"] = round(time.time() - t, 1)
    base_s, final_s = base_eval.summary(), final_eval.summary()
    summary = {
        "objective": cfg.train.objective, "generate_mode": cfg.generate.mode, "seed": cfg.seed,
        "oracle": {"base": base_s["oracle"], "final": final_s["oracle"], "delta": delta["oracle"]},
        "components": {name.split("/", 1)[1]: {"base": base_s[name]["mean"], "final": final_s[name]["mean"],
                                               "delta": delta[name]["mean"], "delta_ci95": delta[name]["ci95"]}
                       for name in base_s if name.startswith("oracle/")},
        # Bad-mode rates (ShapesOracle.failure_modes): did the run remove backwards / static / wrong-colour clips?
        "modes": {name.split("/", 1)[1]: {"base": base_s[name]["mean"], "final": final_s[name]["mean"],
                                          "delta": delta[name]["mean"], "delta_ci95": delta[name]["ci95"]}
                  for name in base_s if name.startswith("mode/") and name in delta},
        "win_rate": delta["win_rate"],
        "implicit_accuracy": {"train": acc_train, "heldout": acc_heldout},
        "labels": json.loads((pairs_dir / "label.json").read_text()) if (pairs_dir / "label.json").exists() else None,
        "train": {k: v for k, v in trained["result"].items() if k not in ("last", "eval")},
        "timings": dict(timings, total_s=round(time.time() - t0, 1)),
    }
    if summary["labels"]:
        summary["labels"].pop("problems", None)
    atomic.write_json(out_dir / "summary.json", summary)
    from vidpo.jobs import _report

    _report(out_dir)
    log.info("oracle: base %.4f -> final %.4f, delta %.4f [%.4f, %.4f]", base_s["oracle"]["mean"],
             final_s["oracle"]["mean"], delta["oracle"]["mean"], *delta["oracle"]["ci95"])
    return summary


# ----- CLI verbs --------------------------------------------------------------------------------------
def _load(args):
    from vidpo.recipe import load_config

    return load_config(args.recipe, args.overrides)


def cmd_generate(args) -> int:
    cfg = _load(args)
    print(json.dumps(generate_pairs(cfg, args.out, split=args.split), indent=2))
    return 0


def cmd_label(args) -> int:
    cfg = _load(args)
    stats = label_pairs(cfg, args.pairs)
    print(json.dumps({k: v for k, v in stats.items() if k != "problems"}, indent=2))
    return 0


def cmd_run(args) -> int:
    from vidpo.jobs import setup_logging

    cfg = _load(args)
    setup_logging(Path(args.out))
    summary = run_pipeline(cfg, args.out, resume=not args.no_resume)
    print(json.dumps({"oracle": summary["oracle"], "win_rate": summary["win_rate"],
                      "timings": summary["timings"]}, indent=2))
    return 0


def add_pipeline_verbs(sub, add_set) -> None:
    p = sub.add_parser("generate", help="sample preference pairs from the policy into shards + pairs.jsonl",
                       description="Sample pairs (generate.mode vanilla | structural) from train.init_from into --out.")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="pairs directory")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    add_set(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("label", help="label the pairs of a pairs directory per segment (manifest.jsonl)",
                       description="Label --pairs DIR with label.labeler (oracle | human | vlm | critic).")
    p.add_argument("recipe")
    p.add_argument("--pairs", required=True, help="pairs directory written by `vidpo generate`")
    add_set(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("run", help="generate -> label -> train -> eval -> report from one recipe",
                       description="The main job: one round of preference optimisation into --out (resumable).")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true")
    add_set(p)
    p.set_defaults(func=cmd_run)
