"""``vidpo generate``: preference pairs sampled from the policy into safetensors shards + ``pairs.jsonl``.

``generate.mode: vanilla`` samples the two videos of a pair from independent noise with classifier-free
guidance; ``structural`` (StructuralDPO) re-generates both from one ground-truth clip by SDEdit at a shared
level ``eta``. A policy with a sampler hook (a diffusers adapter) samples with its own scheduler, the DiT with
the engine's Euler sampler. Shards are written atomically one by one; a rerun skips complete shards.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from vidpo.config import RunConfig
from vidpo.data.pairs import PAIRS_FILE, PairDataError, PairRecord, ShardReader, shard_name, write_manifest
from vidpo.models import flow
from vidpo.models.sampling import has_sampler_hook
from vidpo.training.modeling import build_world, load_initial_policy, pick_device
from vidpo.utils import atomic
from vidpo.utils.seeding import generator

log = logging.getLogger("vidpo")


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
            # a policy with a sampler hook (diffusers adapter) samples and SDEdits with its own
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
