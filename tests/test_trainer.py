"""The training loop: bit-exact resume, the non-finite-loss guard, atomic checkpoints, metrics."""
import dataclasses
import json

import pytest
import torch

from helpers.models import perturb_
from helpers.runs import train_losses as losses
from vidpo.training import checkpoint as ckpt
from vidpo.training.ema import WeightEma, warmed_up_decay
from vidpo.training.metrics import read_metrics
from vidpo.training.modeling import build_policy, build_world
from vidpo.objectives import ShapesSFTObjective
from vidpo.config import ConfigError, load_config
from vidpo.training.trainer import Trainer, TrainingStopped


class Interrupt(Exception):
    pass


def make(tmp_path, micro_overrides, extra=(), name="run"):
    cfg = load_config(None, micro_overrides + ["train.max_steps=6", "train.ckpt_every=2", "train.warmup_steps=2",
                                               "train.lr=3e-3", *extra])
    world = build_world(cfg)
    model = build_policy(cfg, world)
    objective = ShapesSFTObjective(cfg, world, torch.device("cpu"))
    return cfg, model, objective, tmp_path / name


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path, micro_overrides, ema):
    micro_overrides = micro_overrides + [f"train.ema_decay={ema}"]
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
    assert {p.name for p in latest.iterdir()} == {"model.safetensors", "trainer_state.pt", "config.yaml", "meta.json",
                                                 "checksums.json"}
    assert json.loads((latest / "meta.json").read_text())["step"] == 6
    # A leftover of a writer killed mid-checkpoint is ignored by readers and removed by the next writer
    # (its pid is above Linux's PID_MAX_LIMIT: no live process has it, and the cleanup spares live writers).
    (root / "step_0000008.tmp-4194305").mkdir()
    assert ckpt.latest_checkpoint(run_dir).name == "step_0000006"
    ckpt.save_checkpoint(run_dir, 7, model_state=model.state_dict(), trainer_state={}, config_yaml="", keep=2)
    assert not (root / "step_0000008.tmp-4194305").exists()


def test_find_weights_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ckpt.find_weights(tmp_path / "nope")


def test_metrics_rows_and_tensorboard(tmp_path, micro_overrides):
    cfg, model, objective, run_dir = make(tmp_path, micro_overrides)
    Trainer(cfg, run_dir, model, objective, device=torch.device("cpu")).fit()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert all({"step", "loss", "phase"} <= set(r) for r in rows if r["phase"] == "train")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_ema_matches_float64_recursion_and_is_what_checkpoints_export(tmp_path, micro_overrides):
    cfg, model, objective, run_dir = make(tmp_path, micro_overrides, extra=["train.ema_decay=0.8",
                                                                            "train.eval_every=3"])
    history = [{k: p.detach().double().clone() for k, p in model.named_parameters()}]
    seen_at_eval = []
    trainer = Trainer(cfg, run_dir, model, objective, device=torch.device("cpu"),
                      evaluate=lambda m, step: seen_at_eval.append(
                          {k: p.detach().clone() for k, p in m.named_parameters()}) or {"x": 0.0})
    original = trainer.optimizer.step

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        history.append({k: p.detach().double().clone() for k, p in model.named_parameters()})
        return out
    trainer.optimizer.step = record
    trainer.fit()
    expected = {k: v.clone() for k, v in history[0].items()}
    for n, weights in enumerate(history[1:]):
        d = warmed_up_decay(0.8, n)
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    for k, p in model.named_parameters():  # fit() leaves the averaged weights in the model
        torch.testing.assert_close(p.double(), expected[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.double(), history[-1][k]) or history[-1][k].abs().max() == 0
    latest = ckpt.latest_checkpoint(run_dir)
    from safetensors.torch import load_file
    exported, online = load_file(str(latest / "model.safetensors")), load_file(str(latest / ckpt.ONLINE_WEIGHTS))
    for k, p in model.named_parameters():
        assert torch.equal(exported[k], p.detach())
        assert torch.equal(online[k], history[-1][k].float())
    # Evaluation at step 0 saw the initial weights; at step 3 the average of steps 1..3, and training went on
    # from the raw weights; the last one is the final (averaged) policy.
    assert len(seen_at_eval) == 3
    for k, v in seen_at_eval[0].items():
        torch.testing.assert_close(v.double(), history[0][k])
    seen_at_eval = seen_at_eval[1:]
    at_3 = {k: v.clone() for k, v in history[0].items()}
    for n, weights in enumerate(history[1:4]):
        d = warmed_up_decay(0.8, n)
        at_3 = {k: d * at_3[k] + (1 - d) * weights[k] for k in at_3}
    for k, v in seen_at_eval[0].items():
        torch.testing.assert_close(v.double(), at_3[k], rtol=1e-5, atol=1e-6)


def test_ema_resume_needs_the_same_setting(tmp_path, micro_overrides):
    cfg, model, objective, run_dir = make(tmp_path, micro_overrides, extra=["train.max_steps=2"])
    Trainer(cfg, run_dir, model, objective, device=torch.device("cpu")).fit()
    cfg, model, objective, _ = make(tmp_path, micro_overrides, extra=["train.max_steps=4", "train.ema_decay=0.9"])
    with pytest.raises(ConfigError, match="without train.ema_decay"):
        Trainer(cfg, run_dir, model, objective, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="decay"):
        WeightEma(model, 1.0)


def test_ema_lora_checkpoint_exports_the_averaged_adapters(tmp_path, micro_overrides):
    """With LoRA and EMA, lora.safetensors carries the adapters of model.safetensors (the average), while the
    model keeps training from its own adapters."""
    from safetensors.torch import load_file

    from vidpo.models.lora import apply_lora, lora_state_dict, mark_only_lora_trainable

    cfg, model, objective, run_dir = make(tmp_path, micro_overrides, extra=["train.ema_decay=0.8", "lora.rank=2",
                                                                            "train.max_steps=3"])
    perturb_(model)   # the untrained DiT's zero-initialised output layer would give the adapters no gradient
    apply_lora(model, **dataclasses.asdict(cfg.lora))
    mark_only_lora_trainable(model)
    trainer = Trainer(cfg, run_dir, model, objective, device=torch.device("cpu"),
                      lora_state=lambda: (lora_state_dict(model), {"rank": 2}))
    for _ in range(3):
        trainer._train_step()
    online = {k: v.clone() for k, v in lora_state_dict(model).items()}
    trainer.save()
    latest = ckpt.latest_checkpoint(run_dir)
    adapters, averaged = load_file(str(latest / "lora.safetensors")), load_file(str(latest / "model.safetensors"))
    assert adapters
    for key, value in adapters.items():
        assert torch.equal(value, averaged[key.removeprefix("base_model.model.")]), key
    # not vacuous: adapters that trained (lora_B starts at 0) have an average that lags their online value
    assert any(not torch.equal(adapters[k], online[k]) for k in adapters if ".lora_B." in k)
    for key, value in lora_state_dict(model).items():
        assert torch.equal(value, online[key]), "saving must not leave the EMA in the model"
