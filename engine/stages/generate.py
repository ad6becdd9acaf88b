"""``vidpo generate``: preference pairs sampled from the policy into safetensors shards + ``pairs.jsonl``.

``generate.mode: vanilla`` samples the two videos of a pair from independent noise with classifier-free
guidance; ``structural`` (StructuralDPO) re-generates both from one ground-truth clip by SDEdit at a shared
level ``eta``. A policy with a sampler hook (a diffusers adapter) samples with its own scheduler, the DiT with
the engine's Euler sampler. Shards are written atomically one by one; a rerun skips complete shards.

A pairs folder records the settings its pairs were made with (``generate_settings.json``: seed, split, mode,
steps, guidance, sizes, the model and a digest of its config, a fingerprint of the initial weights, the
prompts); a rerun with other settings refuses, naming the keys, unless ``overwrite`` starts the folder over.
``num_pairs`` is not among them: a rerun with more pairs adds shards to the same ones.

Under torchrun the shards are sliced over the ranks (``ShardSlice``): shard k is sampled by rank k mod world
size; with a model-parallel layout (TP / CP) by data-parallel group k mod dp instead, whose ranks sample it together
with the policy split over them (``vidpo.training.policy.prepare_sampling_policy``) and whose first rank saves it.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.data.domains import Domain
from vidpo.data.pairs import PAIRS_FILE, PairDataError, PairRecord, ShardReader, shard_name, write_manifest
from vidpo.models import flow
from vidpo.models.sampling import has_sampler_hook
from vidpo.models.vae import IdentityVAE, VideoVAE
from vidpo.training.checkpoint import find_weights
from vidpo.training.conditioning import Conditioning
from vidpo.training.modeling import build_conditioning, build_domain, load_initial_policy, pick_device
from vidpo.utils import atomic, preemption
from vidpo.utils.lock import LOCK_FILE
from vidpo.utils.provenance import digest, file_fingerprint, record_or_check
from vidpo.utils.seeding import generator

log = logging.getLogger("vidpo")

SETTINGS_FILE = "generate_settings.json"

@dataclass(frozen=True)
class ShardSlice:
    """The shards one process samples: shard k when ``k % count == index``; it saves them when ``writes`` (the
    ranks of a model-parallel group sample the same shards together, and the group's first rank saves them)."""

    index: int = 0
    count: int = 1
    writes: bool = True

    @classmethod
    def of(cls, parallel, rank: int = 0, world_size: int = 1, model_parallel: bool = False) -> "ShardSlice":
        """Rank ``rank`` of ``world_size`` alone, or, with ``model_parallel``, its data-parallel group of
        ``parallel`` (a ``ParallelContext``)."""
        if not model_parallel or parallel is None:
            return cls(rank, world_size, True)
        return cls(parallel.dp_rank, parallel.dp, parallel.tp_rank == 0 and parallel.cp_rank == 0)


RealLatents = Callable[[list, torch.Generator], torch.Tensor]
"""``(prompt_ids, generator) -> (n, C, T, H, W)`` ground-truth latents of the prompts (structural pairs)."""


def generate_pairs(cfg: RunConfig, pairs_dir: str | Path, *, split: str = "train",
                   policy: Optional[torch.nn.Module] = None, domain: Optional[Domain] = None,
                   conditioning: Optional[Conditioning] = None, vae: Optional[VideoVAE] = None,
                   real_latents: Optional[RealLatents] = None, rank: int = 0, world_size: int = 1,
                   overwrite: bool = False, shards: Optional[ShardSlice] = None) -> dict:
    """Sample ``generate.num_pairs`` (or ``heldout_pairs`` for split 'heldout') pairs of the domain's ``split``
    prompts into shards (module docstring). ``domain``, ``conditioning`` and ``vae`` default to the recipe's
    (the shapes world, its tokens, pixels); ``real_latents(prompt_ids, generator)`` gives the ground-truth
    latents structural pairs start from (default: the domain's real clips through the VAE).

    Rank ``rank`` of ``world_size`` processes (a torchrun job's, with its process group up) samples shards
    ``rank, rank + world_size, ...``; every draw of a shard depends on the shard alone (its prompts, its
    per-sample noise streams), so the shards equal one process's. Rank 0 writes ``pairs.jsonl`` once every
    rank is done. ``shards`` (default: rank ``rank`` of ``world_size`` alone) slices them by data-parallel group
    instead, for a ``policy`` split over a model-parallel group. A folder made with other settings is refused
    (module docstring), or emptied when ``overwrite``."""
    shards = shards if shards is not None else ShardSlice(rank, world_size)
    pairs_dir = Path(pairs_dir)
    domain = domain if domain is not None else build_domain(cfg)
    if rank == 0:   # a killed run's temporary files, removed before any rank writes its own
        check_generate_settings(cfg, pairs_dir, domain, split, overwrite=overwrite)
        atomic.clean_leftovers(pairs_dir / "shards")
    if world_size > 1:
        dist.barrier()
    n = cfg.generate.num_pairs if split == "train" else cfg.generate.heldout_pairs
    conditioning = conditioning if conditioning is not None else build_conditioning(cfg, domain)
    vae = vae if vae is not None else IdentityVAE()
    if real_latents is None:
        def real_latents(ids, g):
            clips = domain.real_clips(ids, g)
            if clips is None:
                raise ConfigError("generate.mode=structural needs a real clip per prompt (a 'clip' in the prompt "
                                  "file, encoded by `vidpo run`)")
            return vae.encode(clips)
    prompts = domain.prompts(split)
    device = pick_device()
    model = policy if policy is not None else load_initial_policy(cfg, getattr(domain, "world", None), device)
    model.eval()
    dtype = next(model.parameters()).dtype
    order = torch.randperm(len(prompts), generator=generator(cfg.seed, "gen-cond", split))
    gen = cfg.generate
    try:
        shape = vae.latent_shape(domain.frames, domain.height, domain.width)
    except ValueError as exc:
        raise ConfigError(f"generate.frames / generate.height / generate.width: {exc}") from None
    records: list[PairRecord] = []
    written = skipped = 0

    def velocity(x, t, c):
        return model(x.to(dtype), t.to(dtype), c).float()

    def finish(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x.clamp(-1, 1) if vae.pixel_space else x).cpu()

    num_shards = (n + gen.shard_size - 1) // gen.shard_size
    for k in tqdm(range(num_shards), desc=f"generate[{split}]", disable=not cfg.train.progress or rank != 0,
                  leave=False):
        if k % world_size == 0 and preemption.agreed():   # a stop signal: every rank stops before the same round
            raise preemption.Preempted(f"generate[{split}] stopped before shard {k} of {num_shards}")
        idx = list(range(k * gen.shard_size, min(n, (k + 1) * gen.shard_size)))
        chosen = [prompts[int(i)] for i in order[torch.tensor(idx) % len(prompts)]]
        ids = [p.id for p in chosen]
        cond_ids = domain.condition_ids(ids)
        name = shard_name(k)
        etas = None
        if gen.mode == "structural":
            etas = gen.eta_min + (gen.eta_max - gen.eta_min) * torch.rand(len(idx), generator=generator(
                cfg.seed, "gen-eta", split, k))
        path = pairs_dir / name
        if k % shards.count != shards.index:
            pass   # another rank's (or group's) shard
        elif _shard_complete(path, len(idx)):   # the whole group finds it so: only its writer saves it
            skipped += int(shards.writes)
        else:
            cond = conditioning.for_prompts(ids).to(device)
            negative = conditioning.negative(ids, cond)
            null = model.null_condition(cond) if negative is None else negative.to(device)
            common = dict(null_cond=null, cfg_scale=gen.cfg_scale, steps=gen.steps, seed=cfg.seed)
            tensors = {} if cond_ids is None else {"cond_ids": cond_ids}
            # a policy with a sampler hook (diffusers adapter) samples and SDEdits with its own
            # scheduler (flow-match Euler / UniPC for Wan, DDIM / DPM for CogVideoX); the toy DiT with Euler.
            hook = has_sampler_hook(model)
            if gen.mode == "vanilla":
                for key, stream in (("first", f"{split}-pair-a"), ("second", f"{split}-pair-b")):
                    if hook:
                        x = model.sample(cond, shape, indices=idx, stream=stream, **common)
                    else:
                        x = flow.sample(velocity, (len(idx),) + shape, cond, indices=idx, stream=stream,
                                        device=device, **common)
                    tensors[key] = finish(x)
            else:
                gt = real_latents(ids, generator(cfg.seed, "gen-gt", split, k)).to(device)
                tensors["gt"] = gt.cpu()
                tensors["eta"] = etas
                for key, stream in (("first", f"{split}-sdedit-a"), ("second", f"{split}-sdedit-b")):
                    sdedit = model.sdedit if hook else partial(flow.sdedit, velocity)
                    tensors[key] = finish(sdedit(gt, cond, etas.to(device), indices=idx, stream=stream, **common))
            if shards.writes:
                atomic.save_safetensors(tensors, path, metadata={"mode": gen.mode, "split": split})
                written += 1
        for row, (i, prompt) in enumerate(zip(idx, chosen)):
            records.append(PairRecord(pair_id=f"{split}-{i:06d}", shard=name, row=row, prompt_id=prompt.id,
                                      cond_ids=[] if cond_ids is None else [int(v) for v in cond_ids[row]],
                                      caption=prompt.text, mode=gen.mode,
                                      eta=None if etas is None else round(float(etas[row]), 6)))
    info = {"pairs": n, "shards_written": written, "shards_skipped": skipped, "mode": gen.mode, "split": split,
            "latent_shape": list(shape), "sampling_groups": shards.count,
            "ranks_per_group": max(1, world_size // shards.count)}
    if world_size > 1:
        counts = torch.tensor([written, skipped], dtype=torch.float64)
        dist.all_reduce(counts)   # also the barrier: every shard is on disk before the manifest names it
        info.update(shards_written=int(counts[0]), shards_skipped=int(counts[1]))
    if rank == 0:
        write_manifest(pairs_dir / PAIRS_FILE, records)
        atomic.write_json(pairs_dir / "generate.json", info)
    if world_size > 1:
        dist.barrier()   # the manifest is on disk before any rank reads it
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


def generate_settings(cfg: RunConfig, domain: Domain, split: str) -> dict:
    """What the pairs of a folder depend on, apart from how many there are (module docstring)."""
    gen = cfg.generate
    settings = {"split": split, "seed": cfg.seed, "mode": gen.mode, "steps": gen.steps, "cfg_scale": gen.cfg_scale,
                "shard_size": gen.shard_size, "frames": domain.frames, "height": domain.height,
                "width": domain.width, "model": cfg.model.path or cfg.model.preset, "model_config": model_digest(cfg),
                "init_from": weights_identity(cfg.train.init_from),
                "prompts": domain.prompts(split).digest(), "negative_prompt": cfg.prompts.negative_prompt}
    if gen.mode == "structural":
        settings.update(eta_min=gen.eta_min, eta_max=gen.eta_max)
    world = getattr(domain, "world", None)
    if world is not None:   # the shapes world draws the real clips structural pairs start from
        settings["world"] = digest(cfg.world)
    return settings


def weights_identity(init_from: Optional[str]) -> Optional[str]:
    """The fingerprint of the weights ``train.init_from`` names (not its path: a run reusing another's linked pairs
    names the same weights elsewhere); its path when there are none to read yet (the stage that loads them says
    so)."""
    if not init_from:
        return None
    try:
        return file_fingerprint(find_weights(resolve_path(init_from)))
    except FileNotFoundError:
        return str(resolve_path(init_from))


def model_digest(cfg: RunConfig) -> str:
    """Digest of the model section, less the attention backend (a kernel choice: the same model either way)."""
    return digest({k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "attention"})


def check_generate_settings(cfg: RunConfig, pairs_dir: Path, domain: Domain, split: str, *,
                            overwrite: bool = False) -> None:
    """Record the folder's settings, or check them against the record (SettingsMismatch naming the keys);
    ``overwrite`` first empties a folder that holds pairs (what its old settings produced, labels included)."""
    pairs_dir = Path(pairs_dir)
    if overwrite and ((pairs_dir / SETTINGS_FILE).exists() or (pairs_dir / PAIRS_FILE).exists()):
        removed = atomic.clear_folder(pairs_dir, keep=(LOCK_FILE,))
        log.info("generate: --overwrite: removed %d entries of %s", removed, pairs_dir)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    record_or_check(pairs_dir / SETTINGS_FILE, generate_settings(cfg, domain, split),
                    what="its pairs were", remedy="use another --out, or --overwrite to start the folder over")
