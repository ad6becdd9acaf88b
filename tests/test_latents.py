"""The latent shard dataset and loader: exact rows, deterministic DP-sharded stream, resumable position,
bad shards; and a training run on cached latents that resumes onto exactly the remaining samples."""
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from vidpo.data.latents import FORMAT, LatentDataError, LatentLoader, LatentShardDataset, latent_info

LATENT, TEXT = (4, 2, 4, 4), (6, 8)


def write_cache(root, shard_rows=(3, 3, 2), seed=0):
    """A cache directory in the documented format (what `vidpo cache` writes): sample i has latents filled
    with i, so every read can be checked exactly."""
    g = torch.Generator().manual_seed(seed)
    (root / "shards").mkdir(parents=True)
    shards, start = [], 0
    for k, rows in enumerate(shard_rows):
        ids = torch.arange(start, start + rows, dtype=torch.float32)
        mask = torch.zeros(rows, TEXT[0], dtype=torch.bool)
        mask[:, :3] = True
        tensors = {"latents": ids.view(-1, 1, 1, 1, 1).expand(rows, *LATENT).contiguous().to(torch.bfloat16),
                   "text_emb": torch.randn(rows, *TEXT, generator=g) * mask[..., None],
                   "text_mask": mask}
        name = f"shards/shard_{k:05d}.safetensors"
        save_file(tensors, str(root / name))
        shards.append({"file": name, "rows": rows, "clip_ids": [f"clip{i}" for i in range(start, start + rows)]})
        start += rows
    index = {"format": FORMAT, "num_samples": start, "latent_shape": list(LATENT), "text_shape": list(TEXT),
             "dtype": "bfloat16", "shards": shards, "skipped": []}
    (root / "index.json").write_text(json.dumps(index))
    return root


def _ids(batch):
    return batch["latents"][:, 0, 0, 0, 0].long().tolist()


def test_dataset_reads_exact_rows(tmp_path):
    ds = LatentShardDataset(write_cache(tmp_path))
    assert len(ds) == 8 and ds.clip_ids[5] == "clip5"
    out = ds.read([7, 0, 4, 4])
    assert _ids(out) == [7, 0, 4, 4]
    assert out["latents"].dtype == torch.float32 and out["latents"].shape == (4, *LATENT)
    assert out["text_mask"].dtype == torch.bool and out["text_emb"].shape == (4, *TEXT)
    assert torch.all(out["text_emb"][:, 3:] == 0)
    info = latent_info(tmp_path)
    assert (info.channels, info.text_dim, info.latent_frames) == (4, 8, 2)


def test_every_epoch_visits_every_sample_once(tmp_path):
    ds = LatentShardDataset(write_cache(tmp_path))
    loader = LatentLoader(ds, 2, seed=3, workers=2, prefetch=3)
    seen = [i for _ in range(8) for i in _ids(loader.next_batch())]  # two epochs of 8
    assert sorted(seen[:8]) == sorted(seen[8:]) == list(range(8))
    assert seen[:8] != seen[8:]  # a fresh permutation per epoch
    again = LatentLoader(ds, 2, seed=3, workers=1, prefetch=1)
    assert [i for _ in range(8) for i in _ids(again.next_batch())] == seen
    other = LatentLoader(ds, 2, seed=4)
    assert [i for _ in range(4) for i in _ids(other.next_batch())] != seen[:8]
    ordered = LatentLoader(ds, 3, seed=3, shuffle=False)
    assert [i for _ in range(4) for i in _ids(ordered.next_batch())] == list(range(8)) + list(range(4))
    for item in (loader, again, other, ordered):
        item.close()


def test_data_parallel_ranks_split_the_single_process_stream(tmp_path):
    ds = LatentShardDataset(write_cache(tmp_path))
    single = LatentLoader(ds, 4, seed=1, rank=0, world_size=1)
    ranks = [LatentLoader(ds, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert _ids(whole) == _ids(parts[0]) + _ids(parts[1])
        assert whole["positions"].tolist() == parts[0]["positions"].tolist() + parts[1]["positions"].tolist()
    assert single.state_dict()["cursor"] == ranks[0].state_dict()["cursor"] == ranks[1].state_dict()["cursor"] == 20
    with pytest.raises(ValueError, match="rank 2"):
        LatentLoader(ds, 2, seed=1, rank=2, world_size=2)


def test_resume_continues_with_the_remaining_samples(tmp_path):
    ds = LatentShardDataset(write_cache(tmp_path))
    full = LatentLoader(ds, 3, seed=7, prefetch=4)
    reference = [_ids(full.next_batch()) for _ in range(7)]
    first = LatentLoader(ds, 3, seed=7, prefetch=4)
    for _ in range(3):
        first.next_batch()  # batches 3..6 are already read ahead; the state must not count them
    state = first.state_dict()
    assert state["cursor"] == 9
    resumed = LatentLoader(ds, 3, seed=7, prefetch=2)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_batch()) for _ in range(4)] == reference[3:]
    # Positions do not depend on the batch size: batch 1 from the same cursor gives the same samples.
    small = LatentLoader(ds, 1, seed=7)
    small.load_state_dict(state)
    assert [i for _ in range(3) for i in _ids(small.next_batch())] == reference[3]


def test_bad_shards_are_skipped_or_raise(tmp_path, caplog):
    root = write_cache(tmp_path)
    bad = root / "shards" / "shard_00001.safetensors"
    bad.write_bytes(bad.read_bytes()[:-40])  # truncated
    with pytest.raises(LatentDataError, match="shard_00001.safetensors: shard unreadable"):
        LatentShardDataset(root)
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        ds = LatentShardDataset(root, on_error="skip")
    assert len(ds) == 5 and len(ds.problems) == 1 and "shard_00001" in caplog.text
    assert sorted(_ids(ds.read(range(5)))) == [0, 1, 2, 6, 7]
    other = write_cache(tmp_path / "other")
    (other / "shards" / "shard_00002.safetensors").unlink()
    with pytest.raises(LatentDataError, match="shard_00002.safetensors: shard missing"):
        LatentShardDataset(other)


def test_index_problems_name_the_file(tmp_path):
    with pytest.raises(LatentDataError, match="index.json: not found .not a `vidpo cache`"):
        LatentShardDataset(tmp_path)
    root = write_cache(tmp_path / "c")
    index = json.loads((root / "index.json").read_text())
    index["latent_shape"] = [4, 2, 4, 5]
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(LatentDataError, match=r"'latents' has shape \(3, 4, 2, 4, 4\), the index says"):
        LatentShardDataset(root)


# ----- training on cached latents ----------------------------------------------------------------------
def _train_cfg(root, steps, overrides=()):
    from vidpo.config import load_config

    return load_config(None, [
        "data.source=latents", f"data.shards={root}", "data.workers=1", "data.prefetch=2",
        "model.width=32", "model.depth=1", "model.num_heads=2", "model.patch_size=[1,2,2]",
        f"train.max_steps={steps}", "train.batch_size=3", "train.ckpt_every=2", "train.log_every=1",
        "train.progress=false", "train.warmup_steps=0", "train.min_lr_ratio=1.0", *overrides])


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("phase") == "train" and "loss" in r}


def test_resumed_training_sees_exactly_the_remaining_samples(tmp_path):
    """Two runs over the same 8 cached samples with batch 3 (so batches straddle epochs): one straight to
    step 4, one stopped at step 2 and resumed. Same losses bit for bit, same final loader position. (A
    constant learning rate, so stopping early with max_steps=2 does not change the schedule.)"""
    from vidpo.training import checkpoint as ckpt
    from vidpo.stages.jobs import train_job

    root = write_cache(tmp_path / "cache")
    straight = train_job(_train_cfg(root, 4), tmp_path / "straight", resume=False)
    train_job(_train_cfg(root, 2), tmp_path / "split", resume=False)
    resumed = train_job(_train_cfg(root, 4), tmp_path / "split", resume=True)
    assert straight["samples_consumed"] == resumed["samples_consumed"] == 12
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")
    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path / "split"))
    assert state["objective"]["latent_loader"]["cursor"] == 12
