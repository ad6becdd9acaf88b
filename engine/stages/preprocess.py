"""``vidpo preprocess``: the teacher's part of consistency distillation, computed once into shards.

Source: T2V-Turbo-v2 (arXiv 2410.05677) section 3.2 and appendix A: the ODE inversion of the reference
video and the guided teacher solver step are too costly for every training iteration, so a preprocessing
pass stores them; training then holds no teacher (measured by ``vidpo.objectives.distill``).

Each row of a shard is one training triple and its teacher step (grid ``t_0 = 0 < ... < t_N = 1``,
skip ``k``, ``n`` a multiple of ``k`` in ``[k, N]``)::

    x0      (3, T, H, W)  the training clip (its own motion reference); cond_ids (3,); source 0 curated / 1 web
    x_t     = (1 - t_n) x0 + t_n eps                                  a point of the forward path
    x_prev  = x_t + (t_{n-k} - t_n) v~(x_t, t_n)                      the teacher's guided solver step
    v~      = v_null + w (v_cond - v_null) + eta m grad g(x_t)       (PTA energy, vidpo.models.motion_guidance)

``m = 1`` where motion guidance applies: ``eta > 0``, the row's source is a trusted motion source and
``t_n > 1 - tau`` (the first tau of the solver's steps). Its reference latent ``x_ref_{t_n}`` is the ODE
inversion of ``x0`` up to ``t_n`` through the same grid.

Layout of the output directory::

    meta.json                  settings that determine the shards' content (a rerun with other settings
                               is refused), their digest (each shard carries it) and num_rows
    shards/shard_00000.safetensors   x0, x_t, x_prev (S, 3, T, H, W) float32; t, t_prev, energy (S,) float32;
                               n, source (S,) int64; motion (S,) uint8; cond_ids (S, 3) int64
    index.json                 per-shard row counts and guidance statistics (rewritten at the end)

Resumable: every shard is drawn from its own stream ``(seed, "distill", "rows", shard)`` (always
``shard_size`` rows, truncated for the last shard) and written atomically; a rerun skips shards that are
complete, so an interrupted run continues where it stopped and produces the same data.

Shared with a release's preprocessing (``vidpo.stages.preprocess_real``, Wan and CogVideoX): ``write_shards`` (the
resumable, rank-sliced, atomic shard writer), ``guided_teacher_step`` (the step above for any model, its
unconditional branch given: the null condition here, a negative prompt's embeddings there; its temporal attention
read by a family's probe; a release's own forward path, DDIM step and inversion given by its process,
``vidpo.objectives.distill_process``), ``_check_meta`` and ``DistillData``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from tqdm import tqdm

from vidpo.config import DISTILL_SOURCES, ConfigError, RunConfig, resolve_path
from vidpo.models import flow
from vidpo.models import motion_guidance as mg
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, build_world, pick_device, set_threads
from vidpo.utils import atomic
from vidpo.utils.seeding import generator

log = logging.getLogger("vidpo")

DATA_VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.json"
SHARD_DIR = "shards"
SOURCES = DISTILL_SOURCES   # ("curated", "web"): the index of a row's source in its shard
SHARD_KEYS = ("x0", "x_t", "x_prev", "t", "t_prev", "n", "cond_ids", "source", "motion", "energy")


# ----- grid and settings ---------------------------------------------------------------------------------
def teacher_grid(cfg: RunConfig) -> torch.Tensor:
    """``(N + 1,)`` increasing times ``t_0 = 0 < ... < t_N = 1`` of the teacher solver (float32)."""
    d = cfg.distill
    return flow.time_grid(d.grid_steps, 1.0, shift=d.shift).flip(0).contiguous()


def motion_block(cfg: RunConfig, depth: int) -> int:
    block = cfg.distill.motion_block
    return depth // 2 if block == -1 else block


def content_settings(cfg: RunConfig, teacher_digest: str) -> dict:
    """Everything that determines a shard's content (num_rows is not: shards are prefixes of streams)."""
    d = cfg.distill
    return {
        "version": DATA_VERSION, "seed": cfg.seed, "world": asdict(cfg.world), "model": asdict(cfg.model),
        "teacher_sha256": teacher_digest, "shard_size": d.shard_size, "grid_steps": d.grid_steps,
        "skip": d.skip, "shift": d.shift, "cfg_scale": d.cfg_scale, "curated_fraction": d.curated_fraction,
        "motion_scale": d.motion_scale, "motion_fraction": d.motion_fraction, "motion_block": d.motion_block,
        "motion_sources": sorted(d.motion_sources),
    }


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _differences(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs. Inside a config section only keys both sides have
    are compared: a field added to the config later (at its default) does not invalidate existing data."""
    out = []
    for key in new:
        if isinstance(new[key], dict) and isinstance(old.get(key), dict):
            out += _differences(old[key], {k: v for k, v in new[key].items() if k in old[key]}, f"{prefix}{key}.")
        elif old.get(key) != new[key]:
            out.append(f"{prefix}{key}: {old.get(key)!r} -> {new[key]!r}")
    return out


def _settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_meta(out_dir: Path, settings: dict, num_rows: int) -> str:
    """Refuse to mix shards made with other settings; record them (and num_rows). Returns the digest the
    directory's shards are tagged with: the recorded one when the settings are compatible."""
    path = out_dir / META_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = _differences(recorded.get("settings", {}), settings)
        if changed:
            raise ConfigError(f"{path}: the shards there were made with other settings ({', '.join(changed)}); "
                              "use another --out or delete that directory")
        settings = recorded["settings"]
        digest = recorded.get("digest") or _settings_digest(settings)
    else:
        digest = _settings_digest(settings)
    atomic.write_json(path, {"settings": settings, "digest": digest, "num_rows": num_rows})
    return digest


def shard_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"shard_{index:05d}.safetensors"


def shard_complete(path: Path, rows: int, digest: str, wanted=SHARD_KEYS) -> bool:
    """True when ``path`` is a readable shard of ``rows`` rows made with settings ``digest``, holding ``wanted``."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = set(fh.keys())
    except Exception:  # a truncated or foreign file: recompute it
        return False
    return meta.get("settings") == digest and int(meta.get("rows", -1)) == rows and set(wanted) <= keys


# ----- one shard -------------------------------------------------------------------------------------------
def draw_rows(cfg: RunConfig, world, shard: int, grid: torch.Tensor) -> dict:
    """The random part of shard ``shard``: ``shard_size`` rows of clips, conditions, noise and timesteps."""
    d = cfg.distill
    size = d.shard_size
    g = generator(cfg.seed, "distill", "rows", shard)
    curated = torch.rand(size, generator=g) < d.curated_fraction
    cond_index = torch.randint(world.num_conditions, (size,), generator=g)
    cond_ids = world.condition(cond_index)
    clips = torch.empty(size, 3, world.frames, world.height, world.width)
    for is_curated in (True, False):
        rows = (curated == is_curated).nonzero().flatten()
        if rows.numel():
            clips[rows] = world.render(cond_ids[rows], g, corrupt=not is_curated).clips
    noise = torch.randn(clips.shape, generator=g)
    multiples = d.grid_steps // d.skip
    n = d.skip * torch.randint(1, multiples + 1, (size,), generator=g)
    return {"x0": clips, "cond_ids": cond_ids, "source": (~curated).long(), "noise": noise, "n": n,
            "t": grid[n], "t_prev": grid[n - d.skip]}


def teacher_step(cfg: RunConfig, teacher, world, rows: dict, grid: torch.Tensor, device) -> dict:
    """Guided teacher solver step for a batch of drawn rows: adds x_t, x_prev, motion, energy (+ stats)."""
    tokens = world.tokens(rows["cond_ids"]).to(device)
    return guided_teacher_step(cfg, teacher, rows, tokens, teacher.null_condition(tokens), grid, device,
                               depth=len(teacher.blocks))


def guided_teacher_step(cfg: RunConfig, teacher, rows: dict, cond: torch.Tensor, null: torch.Tensor,
                        grid: torch.Tensor, device, *, depth: int, probe=mg.TemporalAttentionProbe,
                        process=None) -> dict:
    """The teacher's guided solver step (module doc) of rows ``x0, noise, t, t_prev, n, source`` with conditions
    ``cond`` and the unconditional branch ``null`` (the null condition, or a release's negative-prompt
    embeddings); ``probe`` reads the teacher's temporal attention. ``process`` (``vidpo.objectives.distill_process``)
    gives the forward path, the solver step (DDIM) and the inversion of a release's parameterisation; None: the
    rectified flow written out above (Euler)."""
    d = cfg.distill
    x0, noise = rows["x0"].to(device), rows["noise"].to(device)
    t, t_prev = rows["t"].to(device), rows["t_prev"].to(device)
    tokens, null = cond.to(device), null.to(device)
    x_t = flow.interpolate(x0, noise, t) if process is None else process.interpolate(x0, noise, t)
    trusted = torch.tensor([SOURCES[s] in d.motion_sources for s in rows["source"].tolist()], dtype=torch.bool)
    motion = trusted & (rows["t"] > 1.0 - d.motion_fraction) & (d.motion_scale != 0.0)
    block = motion_block(cfg, depth)
    energy = torch.full((x0.shape[0],), float("nan"))
    ref_attention = None
    guided = motion.nonzero().flatten()
    if guided.numel():
        # One inversion pass up to the largest guided time gives every guided row's reference latent.
        top = int(rows["n"][guided].max())
        invert = mg.invert if process is None else process.invert
        latents = invert(lambda x, tt, c: teacher(x, tt, c), x0[guided], tokens[guided], grid[: top + 1])
        x_ref = latents[rows["n"][guided].to(latents.device), torch.arange(guided.numel(), device=latents.device)]
        ref_attention = mg.reference_attention(teacher, x_ref, t[guided], tokens[guided], block, probe=probe)
    v, stats = mg.guided_velocity(teacher, x_t, t, tokens, null, d.cfg_scale, motion_scale=d.motion_scale,
                                  ref_attention=ref_attention, motion_rows=motion.to(device), block=block,
                                  probe=probe)
    x_prev = x_t + (t_prev - t).view(-1, 1, 1, 1, 1) * v if process is None else process.step(x_t, t, t_prev, v)
    if guided.numel():
        energy[guided] = stats["energy"].float().cpu()
    return {"x_t": x_t.float().cpu(), "x_prev": x_prev.float().cpu(), "motion": motion.to(torch.uint8),
            "energy": energy, "stats": stats}


def compute_shard(cfg: RunConfig, teacher, world, shard: int, rows: int, grid: torch.Tensor, device) -> tuple:
    """Tensors of shard ``shard`` (its first ``rows`` rows) and its statistics."""
    drawn = {k: v[:rows] for k, v in draw_rows(cfg, world, shard, grid).items()}
    parts, ratios, energies = [], [], []
    step = max(1, cfg.distill.batch_size)
    for start in range(0, rows, step):
        chunk = {k: v[start:start + step] for k, v in drawn.items()}
        out = teacher_step(cfg, teacher, world, chunk, grid, device)
        parts.append(out)
        if out["stats"]:
            ratios.append((out["stats"]["guidance_rms"] / out["stats"]["velocity_rms"].clamp_min(1e-12)).cpu())
            energies.append(out["stats"]["energy"].cpu())
    tensors = {"x0": drawn["x0"], "cond_ids": drawn["cond_ids"], "source": drawn["source"], "n": drawn["n"],
               "t": drawn["t"], "t_prev": drawn["t_prev"]}
    for key in ("x_t", "x_prev", "motion", "energy"):
        tensors[key] = torch.cat([p[key] for p in parts])
    ratio = torch.cat(ratios) if ratios else torch.zeros(0)
    stats = {"rows": rows, "motion_rows": int(tensors["motion"].sum()),
             "curated_rows": int((tensors["source"] == 0).sum()),
             "mean_energy": float(torch.cat(energies).mean()) if energies else None,
             "mean_guidance_to_velocity": float(ratio.mean()) if ratio.numel() else None}
    return tensors, stats


# ----- the resumable shard writer (the shapes world and releases alike) ------------------------------------------
def write_shards(out_dir: Path, digest: str, num_rows: int, shard_size: int, compute, *, keys=SHARD_KEYS,
                 progress: bool = False, rank: int = 0, world_size: int = 1) -> tuple[int, int, list]:
    """Write the shards ``k = rank, rank + world_size, ...`` of ``ceil(num_rows / shard_size)`` into ``out_dir``:
    ``compute(k, rows) -> (tensors, stats)`` for each one that is not already complete (``shard_complete``), each
    saved atomically with the settings ``digest``. Returns ``(computed, skipped, stats of this rank's shards)``.
    A killed run leaves complete shards and at most temporary files (removed here): a rerun redoes nothing."""
    atomic.clean_leftovers(out_dir / SHARD_DIR)
    num_shards = math.ceil(num_rows / shard_size)
    computed, skipped, shard_stats = 0, 0, []
    for shard in tqdm(range(rank, num_shards, world_size), desc="preprocess", disable=not progress, leave=False):
        rows = min(shard_size, num_rows - shard * shard_size)
        path = shard_path(out_dir, shard)
        if shard_complete(path, rows, digest, keys):
            skipped += 1
            shard_stats.append(shard_stats_of(path))
            continue
        tensors, stats = compute(shard, rows)
        atomic.save_safetensors(tensors, path, metadata={"settings": digest, "rows": str(rows),
                                                         "stats": json.dumps(stats)})
        shard_stats.append(stats)
        computed += 1
    return computed, skipped, shard_stats


def shard_stats_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("stats", "{}"))


# ----- the job ---------------------------------------------------------------------------------------------
def load_teacher(cfg: RunConfig, world, device):
    """The frozen teacher of ``distill.teacher`` (eval mode, no gradients)."""
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher is not set: name the teacher checkpoint, e.g. "
                          "--set distill.teacher=recipes/shapes/base")
    teacher = build_policy(cfg, world, device)
    weights = ckpt.load_weights(teacher, resolve_path(cfg.distill.teacher))
    teacher.eval().requires_grad_(False)
    return teacher, weights


def preprocess_job(cfg: RunConfig, out_dir: str | Path, *, progress: Optional[bool] = None) -> dict:
    """Write the shards of ``cfg`` into ``out_dir`` (resumable); returns counts, statistics and timing."""
    out_dir = Path(out_dir)
    d = cfg.distill
    set_threads(cfg)
    device = pick_device()
    world = build_world(cfg)
    grid = teacher_grid(cfg)
    teacher, weights_path = load_teacher(cfg, world, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = _check_meta(out_dir, content_settings(cfg, _file_digest(weights_path)), d.num_rows)
    num_shards = math.ceil(d.num_rows / d.shard_size)
    t0 = time.time()
    show = cfg.train.progress if progress is None else progress
    computed, skipped, shard_stats = write_shards(
        out_dir, digest, d.num_rows, d.shard_size,
        lambda shard, rows: compute_shard(cfg, teacher, world, shard, rows, grid, device), progress=show)
    seconds = time.time() - t0
    motion_rows = sum(s["motion_rows"] for s in shard_stats)
    ratios = [s["mean_guidance_to_velocity"] for s in shard_stats if s.get("mean_guidance_to_velocity") is not None]
    summary = {"out": str(out_dir), "rows": d.num_rows, "shards": num_shards, "computed": computed,
               "skipped": skipped, "motion_rows": motion_rows,
               "curated_rows": sum(s["curated_rows"] for s in shard_stats),
               "mean_guidance_to_velocity": sum(ratios) / len(ratios) if ratios else None,
               "seconds": round(seconds, 1), "teacher": str(weights_path), "settings_digest": digest}
    atomic.write_json(out_dir / INDEX_FILE, {"summary": summary, "shards": shard_stats})
    log.info("preprocess: %d shards (%d computed, %d already complete), %d rows, %d with motion guidance, %.1fs",
             num_shards, computed, skipped, d.num_rows, motion_rows, seconds)
    return summary


def require_distill_data(cfg: RunConfig) -> str:
    """``distill.data``, which a student's training reads, or the one error that says how to make it."""
    if not cfg.distill.data:
        raise ConfigError("train.objective=consistency_distill needs distill.data: run `vidpo preprocess RECIPE "
                          "--out DATA` first and --set distill.data=DATA (or use `vidpo distill`)")
    return cfg.distill.data


class DistillData:
    """The preprocessed rows of a directory, in memory (only what training reads: x_t, x_prev, t, t_prev,
    cond_ids, source). With ``lazy_keys`` those keys stay on disk and ``rows`` reads just the drawn rows of each
    shard (safetensors slices): a release's latents do not fit in memory at scale."""

    TRAIN_KEYS = ("x_t", "x_prev", "t", "t_prev", "cond_ids", "source")

    def __init__(self, directory: str | Path, keys=TRAIN_KEYS, lazy_keys=()):
        directory = resolve_path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: run `vidpo preprocess RECIPE --out {directory}` first")
        meta = json.loads(meta_path.read_text())
        self.settings = meta["settings"]
        num_rows, size = int(meta["num_rows"]), int(self.settings["shard_size"])
        eager = [k for k in keys if k not in lazy_keys]
        parts: dict = {k: [] for k in eager}
        self.paths = []
        for shard in range(math.ceil(num_rows / size)):
            path = shard_path(directory, shard)
            if not path.exists():
                raise FileNotFoundError(f"{path} missing: preprocessing of {directory} is incomplete; rerun "
                                        "`vidpo preprocess` with the same recipe to finish it")
            with safe_open(str(path), framework="pt") as fh:
                for key in eager:
                    parts[key].append(fh.get_tensor(key))
            self.paths.append(path)
        self.tensors = {k: torch.cat(v) for k, v in parts.items()}
        self.lazy_keys = tuple(k for k in keys if k in lazy_keys)
        self.shard_size = size
        self.directory = directory

    def __len__(self) -> int:
        return self.tensors["t"].shape[0]

    def rows(self, index: torch.Tensor) -> dict:
        out = {k: v[index] for k, v in self.tensors.items()}
        if self.lazy_keys:
            shard, within = index // self.shard_size, index % self.shard_size
            for key in self.lazy_keys:
                rows = [None] * index.numel()
                for k in shard.unique().tolist():
                    positions = (shard == k).nonzero().flatten().tolist()
                    with safe_open(str(self.paths[k]), framework="pt") as fh:
                        sliced = fh.get_slice(key)
                        for i in positions:
                            rows[i] = sliced[int(within[i]):int(within[i]) + 1]
                out[key] = torch.cat(rows)
        return out
