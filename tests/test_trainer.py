"""The training loop: bit-exact resume, the non-finite-loss guard, atomic checkpoints, metrics."""
import json

import pytest
import torch

from vidpo import checkpoint as ckpt
from vidpo.metrics import read_metrics
from vidpo.modeling import build_policy, build_world
from vidpo.objectives import ShapesSFTObjective
from vidpo.recipe import load_config
from vidpo.trainer import Trainer, TrainingStopped


class Interrupt(Exception):
    pass


def make(tmp_path, micro_overrides, extra=(), name="run"):
    cfg = load_config(None, micro_overrides + ["train.max_steps=6", "train.ckpt_every=2", "train.warmup_steps=2",
                                               "train.lr=3e-3", *extra])
    world = build_world(cfg)
    model = build_policy(cfg, world)
    objective = ShapesSFTObjective(cfg, world, torch.device("cpu"))
    return cfg, model, objective, tmp_path / name


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, micro_overrides):
    cfg, model, objective, ref_dir = make(tmp_path, micro_overrides, name="ref")
    Trainer(cfg, ref_dir, model, objective, device=torch.device("cpu")).fit()
    reference = losses(ref_dir)
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]

    cfg, model, objective, run_dir = make(tmp_path, micro_overrides, name="killed")
    original = objective.micro_batch

    def dies_at_step_5(step, micro):
        if step == 4:  # after the step-4 checkpoint is written, during step 5
            raise Interrupt
        return original(step, micro)
    objective.micro_batch = dies_at_step_5
    with pytest.raises(Interrupt):
        Trainer(cfg, run_dir, model, objective, device=torch.device("cpu")).fit()
    assert ckpt.latest_checkpoint(run_dir).name == "step_0000004"

    # A fresh process would rebuild everything from the recipe: do the same.
    cfg, model, objective, _ = make(tmp_path, micro_overrides, name="killed")
    trainer = Trainer(cfg, run_dir, model, objective, device=torch.device("cpu"))
    assert trainer.step == 4
    trainer.fit()
    assert losses(run_dir) == reference  # exact float equality, including the resumed steps 5 and 6
    a = ckpt.load_weights  # weights equal too
    m_ref = build_policy(cfg, build_world(cfg))
    a(m_ref, ref_dir)
    for (k, v), (_, w) in zip(m_ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(v, w), k


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, micro_overrides):
    cfg, model, objective, run_dir = make(tmp_path, micro_overrides, extra=["train.max_bad_steps=3"])
    original = objective.loss
    bad_steps = {2, 4, 5, 6}

    def sometimes_nan(m, batch):
        loss, metrics = original(m, batch)
        return (loss * float("nan") if trainer.step + 1 in bad_steps else loss), metrics
    objective.loss = sometimes_nan
    trainer = Trainer(cfg, run_dir, model, objective, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingStopped, match="3 consecutive non-finite steps"):
        trainer.fit()
    rows = read_metrics(run_dir / "metrics.jsonl", "train")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped == [2, 4, 5, 6]
    assert all(r["loss"] == "nan" for r in rows if r.get("skipped"))
    # The last good state was saved; no parameter is non-finite.
    assert ckpt.latest_checkpoint(run_dir) is not None
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoints_atomic_pruned_and_complete(tmp_path, micro_overrides):
    cfg, model, objective, run_dir = make(tmp_path, micro_overrides, extra=["train.keep_checkpoints=2"])
    Trainer(cfg, run_dir, model, objective, device=torch.device("cpu")).fit()
    root = ckpt.checkpoint_root(run_dir)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_0000004", "step_0000006"]
    latest = ckpt.latest_checkpoint(run_dir)
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "trainer_state.pt", "config.yaml", "meta.json"}
    assert json.loads((latest / "meta.json").read_text())["step"] == 6
    # A leftover of a writer killed mid-checkpoint is ignored by readers and removed by the next writer.
    (root / "step_0000008.tmp-123").mkdir()
    assert ckpt.latest_checkpoint(run_dir).name == "step_0000006"
    ckpt.save_checkpoint(run_dir, 7, model_state=model.state_dict(), trainer_state={}, config_yaml="", keep=2)
    assert not (root / "step_0000008.tmp-123").exists()


def test_find_weights_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ckpt.find_weights(tmp_path / "nope")


def test_metrics_rows_and_tensorboard(tmp_path, micro_overrides):
    cfg, model, objective, run_dir = make(tmp_path, micro_overrides)
    Trainer(cfg, run_dir, model, objective, device=torch.device("cpu")).fit()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert all({"step", "loss", "phase"} <= set(r) for r in rows if r["phase"] == "train")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
