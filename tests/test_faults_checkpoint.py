"""Checkpoints that survive damage, settings that apply or are refused on resume, the divergence guard, and
range checks of numeric settings.

Every run is the micro shapes recipe (helpers.micro) trained by the real Trainer on CPU: a reference run goes
straight to step 6; a "killed" run stops during step 5 (checkpoints 2 and 4 on disk), its files are damaged
the way a disk or a user would, and the resumed run must end with the reference's weights bit for bit.
"""
import json
import logging
import os
import shutil

import pytest
import torch
from helpers.micro import MICRO
from helpers.runs import train_rows
from safetensors.torch import load_file

from vidpo.config import ConfigError, load_config
from vidpo.objectives import ShapesSFTObjective
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, build_world
from vidpo.training.trainer import Trainer, TrainingStopped

CPU = torch.device("cpu")
BASE = ["train.max_steps=6", "train.ckpt_every=2", "train.warmup_steps=2", "train.lr=3e-3",
        "train.keep_checkpoints=3"]


class Interrupt(Exception):
    pass


def trainer(run_dir, *extra, dies_at=None, parallel=None):
    cfg = load_config(None, MICRO + BASE + list(extra))
    world = build_world(cfg)
    model = build_policy(cfg, world)
    objective = ShapesSFTObjective(cfg, world, CPU)
    if dies_at is not None:
        original = objective.micro_batch

        def dies(step, micro):
            if step == dies_at:
                raise Interrupt
            return original(step, micro)
        objective.micro_batch = dies
    return Trainer(cfg, run_dir, model, objective, device=CPU, parallel=parallel)


def weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference and a run killed during step 5 (checkpoints 2 and 4, latest = 4)."""
    root = tmp_path_factory.mktemp("faults")
    trainer(root / "reference").fit()
    with pytest.raises(Interrupt):
        trainer(root / "killed", dies_at=4).fit()
    assert ckpt.latest_checkpoint(root / "killed").name == "step_0000004"
    return root


def killed_copy(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "killed", run)
    return run


def garbage_weights(step_dir):
    (step_dir / "model.safetensors").write_bytes(b"\xff" * 64 + os.urandom(256))


def truncated_state(step_dir):
    path = step_dir / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flipped_byte(step_dir):
    """Same size, one byte changed: only the checksum can tell."""
    path = step_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file", [(garbage_weights, "model.safetensors"),
                                          (truncated_state, "trainer_state.pt"),
                                          (flipped_byte, "model.safetensors")])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(runs, tmp_path, caplog, damage, file):
    run = killed_copy(runs, tmp_path)
    damage(ckpt.checkpoint_root(run) / "step_0000004")
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        resumed = trainer(run)
    assert resumed.step == 2
    log = caplog.text
    assert f"step_0000004 is damaged: {file}: " in log
    assert "resuming from" in log and "step_0000002, the newest intact checkpoint" in log
    resumed.fit()
    assert_same_weights(weights(run), weights(runs / "reference"))
    # the damaged checkpoint was superseded by the resumed run's own step 4, and pruning kept the intact ones
    assert not ckpt.verify_checkpoint(ckpt.checkpoint_root(run) / "step_0000004")


@pytest.mark.parametrize("text, says", [("", "is empty"), ("\x00\x13garbage", "not the name of a step_NNNNNNN"),
                                        ("step_0000009\n", "names step_0000009, which does not exist")])
def test_empty_or_garbage_latest_falls_back_to_the_newest_step_directory(runs, tmp_path, caplog, text, says):
    run = killed_copy(runs, tmp_path)
    (ckpt.checkpoint_root(run) / "latest").write_text(text)
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        resumed = trainer(run)
    assert says in caplog.text and "step_0000004, the newest intact checkpoint" in caplog.text
    assert resumed.step == 4
    with pytest.raises(ckpt.CheckpointError, match=says):   # sample / eval name the file instead of guessing
        ckpt.latest_checkpoint(run)
    resumed.fit()
    assert_same_weights(weights(run), weights(runs / "reference"))


def test_no_intact_checkpoint_is_one_error_naming_every_file(runs, tmp_path):
    run = killed_copy(runs, tmp_path)
    root = ckpt.checkpoint_root(run)
    garbage_weights(root / "step_0000004")
    truncated_state(root / "step_0000002")
    with pytest.raises(ckpt.CheckpointError) as err:
        trainer(run)
    message = str(err.value)
    assert "\n" not in message
    assert "step_0000004: model.safetensors: " in message and "step_0000002: trainer_state.pt: truncated" in message
    assert "--no-resume" in message


def test_checkpoints_without_checksums_are_checked_by_reading_them(runs, tmp_path, caplog):
    run = killed_copy(runs, tmp_path)
    root = ckpt.checkpoint_root(run)
    for step_dir in ckpt.step_dirs(root):
        (step_dir / ckpt.CHECKSUMS).unlink()   # as written before checksums existed
    assert trainer(run).step == 4
    truncated_state(root / "step_0000004")
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        resumed = trainer(run)
    assert "trainer_state.pt: unreadable" in caplog.text
    assert resumed.step == 2


def test_pruning_keeps_the_newest_intact_checkpoint_and_the_one_before_a_divergence(tmp_path):
    state = {"w": torch.ones(3)}

    def save(step, keep, **kw):
        return ckpt.save_checkpoint(tmp_path, step, model_state=state, trainer_state={}, config_yaml="", keep=keep,
                                    **kw)

    root = ckpt.checkpoint_root(tmp_path)
    for step in (2, 4):
        save(step, keep=5)
    truncated_state(root / "step_0000004")
    save(6, keep=2)   # keeps latest (6) and the newest *intact* older one (2), not the damaged 4
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_0000006", "step_0000002"]
    save(8, keep=2, keep_before=3)   # during a divergence that began at step 3: 2 stays too
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_0000008", "step_0000006", "step_0000002"]
    assert json.loads((root / "step_0000008" / "meta.json").read_text()).get("suspect") is None
    save(10, keep=1, keep_before=7, suspect="written while diverging")
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_0000010", "step_0000006"]
    assert ckpt.read_meta(root / "step_0000010")["suspect"] == "written while diverging"


def test_changed_learning_rate_on_resume_is_applied_with_a_message(runs, tmp_path, caplog):
    same = killed_copy(runs, tmp_path / "same")
    trainer(same).fit()
    changed = killed_copy(runs, tmp_path / "changed")
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        resumed = trainer(changed, "train.lr=3e-2")
    assert "train.lr changed from 0.003 to 0.03: the optimizer's learning rate is reset" in caplog.text
    old_lr = trainer(killed_copy(runs, tmp_path / "old")).optimizer.param_groups[0]["lr"]
    new_lr = resumed.optimizer.param_groups[0]["lr"]
    assert new_lr == pytest.approx(10 * old_lr, rel=1e-12)   # the same point of the schedule, 10x the peak
    resumed.fit()
    rows = {r["step"]: r for r in train_rows(changed)}
    assert rows[5]["lr"] == pytest.approx(new_lr)
    ws, wc = weights(same), weights(changed)
    assert any(not torch.equal(ws[k], wc[k]) for k in ws)
    assert_same_weights(ws, weights(runs / "reference"))   # an unchanged resume is still exact


def test_changed_settings_that_cannot_apply_are_refused_naming_them(runs, tmp_path):
    run = killed_copy(runs, tmp_path)
    with pytest.raises(ConfigError) as err:
        trainer(run, "train.batch_size=8", "seed=3", "model.depth=3", "eval.steps=3", "lora.rank=2")
    message = str(err.value)
    assert "lora: None -> {'rank': 2" in message   # a section turned on is one change
    assert "train.batch_size: 4 -> 8 (the data stream is indexed by" in message
    assert "seed: 0 -> 3" in message and "model.depth: 2 -> 3" in message
    assert "eval.steps" not in message   # evaluation settings do not enter the weights: they just apply
    assert "step_0000004" in message and "--no-resume" in message


def test_divergence_rolls_latest_back_to_the_last_checkpoint_before_it(runs, tmp_path, caplog):
    """A healthy run to step 6 is resumed with a learning rate 100x too high: the first updates send the loss and
    gradient norm ~1e6x above their running median (finite, so no NaN guard fires), three such steps stop the
    run, and ``latest`` names step 6 again, not step 8, written after the first ruinous update."""
    run = tmp_path / "run"
    guard = ["train.divergence_window=3", "train.max_bad_steps=3"]
    trainer(run, *guard).fit()
    healthy = weights(run)
    with caplog.at_level(logging.WARNING, logger="vidpo"), pytest.raises(TrainingStopped) as err:
        trainer(run, *guard, "train.lr=0.3", "train.max_steps=20").fit()
    assert "3 consecutive bad (non-finite or diverging) steps" in str(err.value)
    assert "checkpoints/latest now names step_0000006" in str(err.value)
    assert "diverging: loss" in caplog.text
    rows = {r["step"]: r for r in train_rows(run)}
    assert [s for s, r in rows.items() if r.get("diverging")] == [8, 9, 10]
    root = ckpt.checkpoint_root(run)
    assert ckpt.latest_checkpoint(run).name == "step_0000006"
    assert_same_weights(weights(run), healthy)
    moved = root / ckpt.DIVERGED_DIR / "step_0000008"
    assert "suspect" in ckpt.read_meta(moved)
    ruined = load_file(str(moved / "model.safetensors"))
    assert any(not torch.equal(ruined[k], healthy[k]) for k in healthy)
    # resuming with a sane learning rate goes on from the healthy checkpoint, ignoring the diverged ones
    assert trainer(run, *guard, "train.max_steps=8").step == 6


def test_a_stop_with_no_checkpoint_before_the_streak_moves_nothing(tmp_path):
    """NaNs from step 5 on, with the only checkpoint (step 4, keep 1) the one whose weights gave the first NaN:
    nothing to roll back to, so latest stays and the error says so."""
    run = tmp_path / "run"
    t = trainer(run, "train.keep_checkpoints=1", "train.max_bad_steps=2", "train.ckpt_every=4")
    original = t.objective.loss
    t.objective.loss = lambda m, batch: ((lambda loss, metrics: (loss * float("nan") if t.step >= 4 else loss,
                                                                 metrics))(*original(m, batch)))
    with pytest.raises(TrainingStopped, match="2 consecutive non-finite steps .* no checkpoint in .* was written "
                                              "before it, so checkpoints/latest is left as it was"):
        t.fit()
    assert ckpt.latest_checkpoint(run).name == "step_0000004"
    assert not (ckpt.checkpoint_root(run) / ckpt.DIVERGED_DIR).exists()


@pytest.mark.parametrize("override", ["train.batch_size=0", "train.lr=-1", "label.segment_seconds=0",
                                      "pref.beta=-5", "train.max_steps=-3"])
def test_bad_numeric_values_of_the_issue_are_refused_naming_the_field(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"--set {key}: {key} must be"):
        load_config(None, MICRO + [override])


# ----- multi-process (DCP) checkpoints: 2 gloo processes ---------------------------------------------------
def save_two_dcp_checkpoints(run_dir):
    """Both ranks write checkpoints 1 and 2 of a replicated-DP micro policy (a real AdamW step before each)."""
    from vidpo.config import ParallelConfig
    from vidpo.training import dist_checkpoint, distributed

    ctx = distributed.init_distributed(ParallelConfig(dp_shard=1))
    cfg = load_config(None, MICRO)
    model = build_policy(cfg, build_world(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in (1, 2):
        optimizer.zero_grad()
        sum((p.float() ** 2).sum() + p.sum() for p in model.parameters()).backward()
        optimizer.step()
        dist_checkpoint.save_distributed_checkpoint(run_dir, step, model=model, optimizer=optimizer,
                                                    trainer_state={"scheduler": {}}, config_yaml="", ctx=ctx,
                                                    keep=2, suspect="planted" if step == 2 else None)


def parallel_trainer(run_dir, ctx, *extra, dies_at=None):
    """``trainer`` under a 2-rank replicated data-parallel context (each rank computes the whole micro-batch;
    the summed gradient is the same on both ranks), writing DCP checkpoints."""
    return trainer(run_dir, *extra, dies_at=dies_at, parallel=ctx)


def damaged_dcp_checkpoint_falls_back_in_the_trainer(root):
    """Under torchrun: a run killed during step 5 whose step-4 DCP shard is then damaged resumes (rank 0
    verifies, every rank follows) from step 2 and ends where the uninterrupted 2-rank run ends."""
    from vidpo.config import ParallelConfig
    from vidpo.training import distributed

    ctx = distributed.init_distributed(ParallelConfig(dp_shard=1))
    root = os.fspath(root)
    parallel_trainer(f"{root}/reference", ctx).fit()
    with pytest.raises(Interrupt):
        parallel_trainer(f"{root}/killed", ctx, dies_at=4).fit()
    if ctx.is_main:
        shard = sorted((ckpt.checkpoint_root(f"{root}/killed") / "step_0000004" / "dcp").glob("*.distcp"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    ctx.barrier()
    resumed = parallel_trainer(f"{root}/killed", ctx)
    assert resumed.step == 2, resumed.step
    resumed.fit()


def dcp_worker(rank, port, result_dir, run_dir):
    from helpers.distributed import record, set_torchrun_env, vidpo_shutdown, worker_results

    set_torchrun_env(rank, port, OMP_NUM_THREADS="1")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        record(results, "save", save_two_dcp_checkpoints, run_dir)
        record(results, "trainer", damaged_dcp_checkpoint_falls_back_in_the_trainer, os.path.dirname(run_dir))


def test_dcp_checkpoints_carry_checksums_and_a_damaged_one_falls_back(tmp_path, caplog):
    """2 gloo processes: checkpoints written by both ranks list every rank's files; a damaged DCP shard is named
    and skipped, by ``resume_point`` and by a 2-rank Trainer, which then ends with the uninterrupted weights."""
    pytest.importorskip("megatron.core")
    from helpers.distributed import assert_all_ranks_ok, spawn_workers

    from vidpo.training import dist_checkpoint

    run = tmp_path / "run"
    per_rank = spawn_workers(dcp_worker, str(tmp_path), str(run))
    assert_all_ranks_ok(per_rank, "save")
    assert_all_ranks_ok(per_rank, "trainer")
    assert_same_weights(weights(tmp_path / "killed"), weights(tmp_path / "reference"))
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "killed"))["format"] == "dcp"
    root = ckpt.checkpoint_root(run)
    for step_dir in ckpt.step_dirs(root):   # every file of every rank is listed (each rank hashed a share)
        listed = json.loads((step_dir / ckpt.CHECKSUMS).read_text())["files"]
        assert sorted(listed) == ckpt.checkpoint_files(step_dir)
        assert "dcp/.metadata" in listed and len([n for n in listed if n.endswith(".distcp")]) == 2
        assert not ckpt.verify_checkpoint(step_dir)
    assert ckpt.read_meta(root / "step_0000002")["suspect"] == "planted"
    shard = sorted((root / "step_0000002" / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        found = ckpt.resume_point(run)
    assert found.name == "step_0000001"
    assert f"step_0000002 is damaged: dcp/{shard.name}: corrupt" in caplog.text
    cfg = load_config(None, MICRO)
    model = build_policy(cfg, build_world(cfg))
    dist_checkpoint.load_distributed_checkpoint(found, model=model)
    saved = load_file(str(found / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
