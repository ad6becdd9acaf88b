"""The preference pipeline on the micro world: generate -> label -> train -> eval, resumability and bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.models import save_perturbed_base
from helpers.runs import train_losses
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, PairDataError, read_manifest
from vidpo.training.metrics import read_metrics
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import label_pairs
from vidpo.stages.pipeline import run_pipeline, train_preference
from vidpo.config import load_config


@pytest.fixture
def base_ckpt(tmp_path, micro_overrides):
    """A micro policy to start from (untrained DiTs output exactly zero: perturbed so samples are not all
    identical)."""
    return save_perturbed_base(load_config(None, micro_overrides), tmp_path / "base.safetensors")


def pref_cfg(micro_overrides, base, *extra):
    return load_config(None, micro_overrides + [f"train.init_from={base}", "train.objective=dense_dpo",
                                                "train.max_steps=4", "train.ckpt_every=2", "train.lr=1e-3",
                                                "train.warmup_steps=0", "flow.t_min=0.3", *extra])


def recs_have_prompts(pairs_dir) -> bool:
    """Every generated pair names its prompt: the shapes world's prompt ids follow its condition order."""
    recs, _ = read_manifest(pairs_dir / PAIRS_FILE, need_labels=False)
    return all(r.prompt_id == f"shapes-{index:04d}" for r in recs
               for index in [r.cond_ids[0] * 8 + r.cond_ids[1] * 4 + r.cond_ids[2]])


def test_generate_vanilla_and_resume_skips_complete_shards(tmp_path, micro_overrides, base_ckpt):
    cfg = pref_cfg(micro_overrides, base_ckpt)
    info = generate_pairs(cfg, tmp_path / "pairs")
    assert info == {"pairs": 8, "shards_written": 2, "shards_skipped": 0, "mode": "vanilla", "split": "train",
                    "latent_shape": [3, 4, 8, 8], "sampling_groups": 1, "ranks_per_group": 1}
    assert recs_have_prompts(tmp_path / "pairs")
    recs, problems = read_manifest(tmp_path / "pairs" / PAIRS_FILE, need_labels=False)
    assert len(recs) == 8 and not problems and recs[0].caption
    shard = tmp_path / "pairs" / recs[0].shard
    mtime = shard.stat().st_mtime_ns
    # A torn second shard (a kill mid-write leaves a leftover, never a half-written shard; simulate a
    # deleted one): the rerun regenerates only what is missing, bit-identically.
    second = tmp_path / "pairs" / recs[-1].shard
    before = load_file(str(second))
    second.unlink()
    again = generate_pairs(cfg, tmp_path / "pairs")
    assert again["shards_written"] == 1 and again["shards_skipped"] == 1
    assert shard.stat().st_mtime_ns == mtime
    after = load_file(str(second))  # (the header's metadata order is not stable, so compare tensors)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_structural_pairs_share_eta_and_ground_truth(tmp_path, micro_overrides, base_ckpt):
    cfg = pref_cfg(micro_overrides, base_ckpt, "generate.mode=structural", "generate.eta_min=0.4",
                   "generate.eta_max=0.6")
    generate_pairs(cfg, tmp_path / "pairs")
    recs, _ = read_manifest(tmp_path / "pairs" / PAIRS_FILE, need_labels=False)
    shard = load_file(str(tmp_path / "pairs" / recs[0].shard))
    assert set(shard) >= {"first", "second", "gt", "eta", "cond_ids"}
    assert ((shard["eta"] >= 0.4) & (shard["eta"] <= 0.6)).all()
    assert all(0.4 <= r.eta <= 0.6 and r.mode == "structural" for r in recs)
    # Both videos are re-generations of the ground truth: closer to it than to another pair's ground truth.
    d_own = (shard["first"] - shard["gt"]).pow(2).mean((1, 2, 3, 4))
    d_other = (shard["first"] - shard["gt"].roll(1, 0)).pow(2).mean((1, 2, 3, 4))
    assert (d_own < d_other).float().mean() >= 0.75
    assert not torch.equal(shard["first"], shard["second"])


def test_label_then_train_dense_dpo_and_kto(tmp_path, micro_overrides, base_ckpt):
    cfg = pref_cfg(micro_overrides, base_ckpt, f"pref.pairs={tmp_path / 'pairs'}")
    generate_pairs(cfg, tmp_path / "pairs")
    stats = label_pairs(cfg, tmp_path / "pairs")
    assert stats["pairs"] == 8 and stats["segments"] == 2 and stats["failed_comparisons"] == 0
    recs, _ = read_manifest(tmp_path / "pairs" / MANIFEST_FILE, num_segments=2)
    assert all(len(r.labels) == 2 and r.label_source == "oracle" for r in recs)
    assert not (tmp_path / "pairs" / "labels.partial.jsonl").exists()

    out = train_preference(cfg, tmp_path / "dense")
    rows = read_metrics(tmp_path / "dense" / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 <= r["accuracy"] <= 1 and "margin_mean" in r for r in rows)
    assert out["result"]["reference"] == "frozen_copy"

    kto = load_config(None, [*micro_overrides, f"train.init_from={base_ckpt}", "train.objective=kto",
                             "train.max_steps=2", f"pref.pairs={tmp_path / 'pairs'}", "lora.rank=2"])
    out = train_preference(kto, tmp_path / "kto")
    assert out["result"]["reference"] == "lora_disabled"
    assert (tmp_path / "kto" / "lora.safetensors").exists()
    assert (tmp_path / "kto" / "checkpoints" / "latest").exists()
    rows = read_metrics(tmp_path / "kto" / "metrics.jsonl", "train")
    assert all("reward_desirable" in r for r in rows)


def test_bad_manifest_lines_and_missing_shard(tmp_path, micro_overrides, base_ckpt):
    cfg = pref_cfg(micro_overrides, base_ckpt, f"pref.pairs={tmp_path / 'pairs'}")
    generate_pairs(cfg, tmp_path / "pairs")
    label_pairs(cfg, tmp_path / "pairs")
    manifest = tmp_path / "pairs" / MANIFEST_FILE
    good = manifest.read_text()
    lines = good.splitlines()
    lines[2] = "{not json"
    bad = json.loads(lines[3])
    bad["labels"] = [1, 7]
    lines[3] = json.dumps(bad)
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(PairDataError, match=rf"{manifest}:3: not valid JSON"):
        read_manifest(manifest, on_error="raise")
    recs, problems = read_manifest(manifest, on_error="skip")
    assert len(recs) == 6 and len(problems) == 2
    assert f"{manifest}:4: pair {bad['pair_id']}: 'labels'" in problems[1]

    # A missing shard is named with the pairs that needed it; by policy, skipped (counted) or fatal.
    (tmp_path / "pairs" / recs[0].shard).unlink()
    out = train_preference(cfg, tmp_path / "run")
    assert out["result"]["skipped_pairs"] == 4  # 2 bad lines (pairs 2, 3) + pairs 0, 1 of the missing shard
    strict = pref_cfg(micro_overrides, base_ckpt, f"pref.pairs={tmp_path / 'pairs'}", "pref.on_bad_pair=raise")
    with pytest.raises(PairDataError, match=rf"{manifest}:3: not valid JSON"):
        train_preference(strict, tmp_path / "run2")
    manifest.write_text(good)
    with pytest.raises(PairDataError, match=r"shard_00000.safetensors: shard missing \(needed by pair train-000000\)"):
        train_preference(strict, tmp_path / "run3")


def test_resume_after_kill_reproduces_losses(tmp_path, micro_overrides, base_ckpt):
    import vidpo.objectives.preference as pref

    cfg = pref_cfg(micro_overrides, base_ckpt, f"pref.pairs={tmp_path / 'pairs'}", "train.max_steps=5")
    generate_pairs(cfg, tmp_path / "pairs")
    label_pairs(cfg, tmp_path / "pairs")
    train_preference(cfg, tmp_path / "ref")
    reference = train_losses(tmp_path / "ref")

    original = pref.PreferenceObjective.micro_batch

    def killed(self, step, micro):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step, micro)
    pref.PreferenceObjective.micro_batch = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train_preference(cfg, tmp_path / "run")
    finally:
        pref.PreferenceObjective.micro_batch = original
    train_preference(cfg, tmp_path / "run")
    resumed = train_losses(tmp_path / "run")
    assert resumed == reference


def test_run_pipeline_summary(tmp_path, micro_overrides, base_ckpt):
    cfg = pref_cfg(micro_overrides, base_ckpt, "train.objective=flow_dpo", "label.granularity=video")
    summary = run_pipeline(cfg, tmp_path / "run")
    oracle = summary["oracle"]
    for key in ("base", "final"):
        assert 0 <= oracle[key]["mean"] <= 1
    lo, hi = oracle["delta"]["ci95"]
    assert lo <= oracle["delta"]["mean"] <= hi
    assert summary["implicit_accuracy"]["heldout"] is not None
    assert set(summary["components"]) == {"colour", "shape", "motion", "consistency"}
    for name in ("summary.json", "report.html", "samples/base.gif", "samples/final.gif", "pairs/manifest.jsonl",
                 "pairs_heldout/manifest.jsonl", "metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["oracle"] == json.loads(json.dumps(oracle))
