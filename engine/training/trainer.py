"""The training loop shared by every objective (SFT, Flow-DPO, DenseDPO, KTO).

What it guarantees:
* **Exact resume.** Every micro-batch is drawn from streams named by ``(seed, step, micro)``; checkpoints
  hold weights (fp32 safetensors), optimizer and LR-schedule state and the global RNG state. A run
  killed and restarted from its last checkpoint reproduces the uninterrupted run's losses bit for bit on
  CPU (same thread count).
* **Nothing lost.** Checkpoints are written atomically (``vidpo.training.checkpoint``); metrics rows logged after
  the resumed checkpoint are dropped and re-logged.
* **Bad steps do not poison the model.** A non-finite loss or gradient norm skips the optimizer step, is
  logged (``skipped=1``) and counted. A finite step whose loss or gradient norm is far above its running
  level (``train.divergence_factor`` x the median of the last ``train.divergence_window`` healthy steps,
  vidpo.training.divergence) is logged ``diverging=1``. Both are bad steps: checkpoints written during a
  streak of them are marked suspect (``meta.json``), and pruning keeps the newest checkpoint from before the
  streak. ``train.max_bad_steps`` consecutive ones stop the run: ``latest`` is rolled back to the last
  checkpoint written before the streak began (later ones move to ``checkpoints/diverged/``), so a resume
  starts from weights that were still healthy, not from the last finite ones.
* **Resume checks what it resumes.** The checkpoint ``latest`` names is verified against its checksums; a
  damaged one is reported by file and the newest intact one used (vidpo.training.checkpoint). Settings that
  differ from the checkpoint's are applied with a message or refused naming them (vidpo.training.resume).
* **EMA** (``train.ema_decay > 0``, vidpo.training.ema): evaluation runs on the averaged weights, checkpoints
  write them as ``model.safetensors`` and the optimizer's own as ``online.safetensors`` (multi-process runs:
  both in ``dcp/``, the average also consolidated into ``model.safetensors``); resume restores both.
* **Distributed runs** (``parallel``: a ``vidpo.training.distributed.ParallelContext``): the objective's loss is
  already the global loss on every rank; the loop sums unsharded gradients over data/context-parallel
  ranks, clips by the norm of the whole model, writes DCP checkpoints (``vidpo.training.dist_checkpoint``) and
  lets rank 0 alone log metrics. A checkpoint of any world size resumes at any other.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from vidpo.config import ConfigError, RunConfig, to_yaml
from vidpo.training import checkpoint as ckpt
from vidpo.training import dist_checkpoint, distributed, resume
from vidpo.training.divergence import DivergenceGuard
from vidpo.training.ema import WeightEma
from vidpo.training.metrics import MetricsLogger
from vidpo.training.modeling import autocast_context
from vidpo.utils import preemption

log = logging.getLogger("vidpo")


class TrainingStopped(RuntimeError):
    """The run stopped by policy (too many consecutive non-finite or diverging steps)."""


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg: RunConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: torch's fused kernel on GPU, apex FusedAdam only when asked for and importable."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    kwargs = dict(lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
    choice = cfg.train.optimizer
    if choice == "apex":
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, not the unrelated PyPI 'apex' package
        except ImportError:
            raise ImportError("train.optimizer=apex needs NVIDIA apex (built from github.com/NVIDIA/apex); "
                              "the PyPI package named 'apex' is unrelated. Use 'fused_adamw' instead.") from None
        return FusedAdam(params, adam_w_mode=True, **kwargs)
    fused = choice == "fused_adamw" or (choice == "auto" and device.type == "cuda")
    if fused and device.type != "cuda":
        raise ValueError("train.optimizer=fused_adamw needs a CUDA device; use 'adamw' or 'auto' on CPU")
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


class Trainer:
    """Runs ``objective`` on ``model`` for ``cfg.train.max_steps`` optimizer steps into ``run_dir``.

    ``evaluate(model, step) -> dict`` (optional) is called every ``train.eval_every`` steps and at the end;
    with ``train.ema_decay`` it sees the EMA weights, and ``fit`` leaves them in ``model`` when it returns;
    its numeric results are logged with phase "eval". ``extra_state()`` / ``lora_state()`` hooks let the
    caller put more into checkpoints (e.g. LoRA adapters on their own).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, model: torch.nn.Module, objective, *,
                 device: torch.device, evaluate: Optional[Callable] = None, resume: bool = True,
                 lora_state: Optional[Callable[[], tuple[dict, dict]]] = None, log_every: Optional[int] = None,
                 parallel=None):
        self.cfg = cfg
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main
        if parallel is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Every rank would train the whole model on the whole batch and write the same files.
            raise ConfigError(f"this process is one of WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun) but "
                              f"train.objective={cfg.train.objective} runs in one process; distributed training "
                              "covers flow_dpo, dense_dpo and kto")
        self.run_dir = Path(run_dir)
        self.model = model
        self.objective = objective
        self.device = device
        self.evaluate = evaluate
        self.lora_state = lora_state
        self.log_every = log_every or cfg.train.log_every
        self.optimizer = build_optimizer(cfg, model.parameters(), device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.bad_in_row = 0
        self.nonfinite_in_row = 0
        self.bad_since: Optional[int] = None   # the step whose weights gave the first bad loss of the streak
        self.skipped_total = 0
        self.guard = DivergenceGuard(cfg.train.divergence_factor, cfg.train.divergence_window)
        self.ema: Optional[WeightEma] = None
        if cfg.train.ema_decay > 0:
            # Under a parallel layout each rank averages its own shard (FSDP DTensor chunk / TP slice): the
            # update is elementwise, so no communication; checkpoints consolidate it (vidpo.training.dist_checkpoint).
            self.ema = WeightEma(model, cfg.train.ema_decay)
        resume_from = self._resume_point() if resume else None
        if resume_from is not None:
            self._restore(resume_from)
        self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if resume_from is not None else None,
                                     enabled=self.is_main)

    # ----- checkpoints --------------------------------------------------------------------------------
    def _resume_point(self) -> Optional[Path]:
        """The newest intact checkpoint (vidpo.training.checkpoint.resume_point); under torchrun rank 0 verifies
        it (reading every file once) and the others take its answer."""
        if self.parallel is None:
            return ckpt.resume_point(self.run_dir)
        name, error = None, None
        if self.is_main:
            try:
                found = ckpt.resume_point(self.run_dir)
                name = found.name if found is not None else None
            except ckpt.CheckpointError as e:
                error = str(e)
        name, error = self.parallel.broadcast_object((name, error))
        if error is not None:
            raise ckpt.CheckpointError(error)
        return None if name is None else ckpt.checkpoint_root(self.run_dir) / name

    def _check_settings(self, path: Path) -> resume.Changes:
        """Compare the run's settings with the checkpoint's: ConfigError naming every refused change."""
        saved = path / "config.yaml"
        changes = resume.compare(saved.read_text() if saved.exists() else "", self.cfg)
        if changes.refused:
            raise ConfigError(resume.refusal(str(path), changes))
        return changes

    def _apply_settings(self, changes: resume.Changes) -> None:
        """Put the changed hyper-parameters into the restored optimizer and schedule, saying so."""
        cfg = self.cfg
        for key, old, new in changes.applied:
            log.warning("resume: %s changed from %s to %s: %s", key, resume.show(old), resume.show(new),
                        resume.APPLIED[key])
        for key, old, new in changes.no_effect:
            log.info("resume: %s changed from %s to %s (does not enter the trained weights)", key, resume.show(old),
                     resume.show(new))
        groups = self.optimizer.param_groups
        keys = changes.keys("applied")
        for group in groups:
            if "train.weight_decay" in keys:
                group["weight_decay"] = cfg.train.weight_decay
            if "train.betas" in keys:
                group["betas"] = tuple(cfg.train.betas)
        if keys & set(resume.SCHEDULE_KEYS):
            # the restored scheduler holds the old peak (base_lrs); its factor function is the new recipe's
            factor = lr_lambda(cfg)(self.scheduler.last_epoch)
            self.scheduler.base_lrs = [cfg.train.lr for _ in groups]
            for group in groups:
                group["initial_lr"] = cfg.train.lr
                group["lr"] = cfg.train.lr * factor
            self.scheduler._last_lr = [group["lr"] for group in groups]
            log.warning("resume: learning rate at step %d is now %.6g (train.lr=%g)", self.step, groups[0]["lr"],
                        cfg.train.lr)
        if "train.divergence_factor" in keys or "train.divergence_window" in keys:
            self.guard.factor, self.guard.window = cfg.train.divergence_factor, cfg.train.divergence_window

    def _restore(self, path: Path) -> None:
        changes = self._check_settings(path)
        if dist_checkpoint.is_distributed_checkpoint(path):
            state = dist_checkpoint.load_distributed_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                                                ctx=self.parallel, ema=self.ema)
        elif self.parallel is not None:
            state = dist_checkpoint.load_single_process_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                                                   ctx=self.parallel, ema=self.ema)
        else:
            state = ckpt.load_trainer_state(path)
            online = path / ckpt.ONLINE_WEIGHTS
            dist_checkpoint.check_ema_match(path, online.exists(), self.ema is not None)
            if self.ema is not None:
                self.ema.load_model_state(load_file(str(path / "model.safetensors")), state["ema_updates"])
                ckpt.load_weights(self.model, online)
            else:
                ckpt.load_weights(self.model, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.step = int(state["step"])
        self.bad_in_row = int(state.get("bad_in_row", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", self.bad_in_row))
        self.bad_since = state.get("bad_since")
        self.skipped_total = int(state.get("skipped_total", 0))
        self.guard.load_state_dict(state.get("divergence", {}))
        ckpt.set_rng_state(state["rng"])
        self._apply_settings(changes)
        log.info("resumed from %s at step %d", path, self.step)
        suspect = ckpt.read_meta(path).get("suspect") if (path / "meta.json").exists() else None
        if suspect:
            log.warning("resume: %s is marked suspect: %s", path.name, suspect)

    def save(self) -> Path:
        if self.parallel is not None:
            lora_meta = self.lora_state()[1] if self.lora_state else None
            state = {"scheduler": self.scheduler.state_dict(), "objective": self.objective.state_dict(),
                     **self._loop_state()}
            return dist_checkpoint.save_distributed_checkpoint(
                self.run_dir, self.step, model=self.model, optimizer=self.optimizer, trainer_state=state,
                config_yaml=to_yaml(self.cfg), ctx=self.parallel, keep=self.cfg.train.keep_checkpoints,
                lora_metadata=lora_meta, ema=self.ema, suspect=self._suspect(), keep_before=self.bad_since)
        lora, lora_meta = None, None
        if self.lora_state is not None:   # the adapters of model.safetensors: the EMA's when it is on
            with (self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()):
                lora, lora_meta = self.lora_state()
                lora = {k: v.clone() for k, v in lora.items()}   # they alias the parameters (online again below)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "objective": self.objective.state_dict(), **self._loop_state()}
        model_state, online_state = self.model.state_dict(), None
        if self.ema is not None:
            model_state, online_state = self.ema.model_state(self.model), model_state
            state["ema_updates"] = self.ema.updates
        return ckpt.save_checkpoint(self.run_dir, self.step, model_state=model_state,
                                    trainer_state=state, config_yaml=to_yaml(self.cfg), lora_state=lora,
                                    lora_metadata=lora_meta, keep=self.cfg.train.keep_checkpoints,
                                    online_state=online_state, suspect=self._suspect(), keep_before=self.bad_since)

    def _loop_state(self) -> dict:
        return {"bad_in_row": self.bad_in_row, "nonfinite_in_row": self.nonfinite_in_row,
                "bad_since": self.bad_since, "skipped_total": self.skipped_total,
                "divergence": self.guard.state_dict()}

    def _suspect(self) -> Optional[str]:
        if self.bad_since is None:
            return None
        return (f"written during {self.bad_in_row} consecutive bad (non-finite or diverging) steps that began at "
                f"step {self.bad_since + 1}")

    def _stop(self) -> TrainingStopped:
        """Roll ``latest`` back to the last checkpoint from before the streak of bad steps; the error to raise."""
        cfg, began = self.cfg, self.bad_since
        kept = ckpt.roll_back(self.run_dir, began) if self.is_main else None
        if self.parallel is not None:
            kept = self.parallel.broadcast_object(kept)
        kind = "non-finite" if self.nonfinite_in_row == self.bad_in_row else "bad (non-finite or diverging)"
        root = ckpt.checkpoint_root(self.run_dir)
        where = (f"checkpoints/latest now names {kept.name}, the last checkpoint written before it (later ones are in "
                 f"{root / ckpt.DIVERGED_DIR})" if kept is not None else
                 f"no checkpoint in {root} was written before it, so checkpoints/latest is left as it was (its "
                 "weights may be ruined: start over with --no-resume if a resume stops again)")
        return TrainingStopped(
            f"{self.bad_in_row} consecutive {kind} steps (train.max_bad_steps={cfg.train.max_bad_steps}) at step "
            f"{self.step}; the run began to go wrong at step {began + 1}: {where}. Lower train.lr (a resumed run "
            "applies the new value) or check the data.")

    # ----- one optimizer step ---------------------------------------------------------------------------
    def _train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        sums: dict[str, float] = {}
        finite = True
        for micro in range(cfg.train.grad_accum):
            batch = self.objective.micro_batch(self.step, micro)
            with autocast_context(cfg, self.device):
                loss, metrics = self.objective.loss(self.model, batch)
            if not torch.isfinite(loss):
                finite = False
                break
            (loss / cfg.train.grad_accum).backward()
            total_loss += loss.item() / cfg.train.grad_accum
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) / cfg.train.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float("nan")
        if finite:
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            if self.parallel is not None:
                distributed.sync_replicated_grads(params, self.parallel)
                grad_norm = float(distributed.clip_grad_norm_(self.model, clip, self.parallel))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            finite = math.isfinite(grad_norm)
        row = {"loss": total_loss if finite else float("nan"), "grad_norm": grad_norm,
               "lr": self.scheduler.get_last_lr()[0], **sums}
        at = self.step   # the loss and gradient were computed with the weights of checkpoint step `at`
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            why = self.guard.check(total_loss, grad_norm)
            if why is None:
                self.bad_in_row, self.nonfinite_in_row, self.bad_since = 0, 0, None
            else:
                self._bad_step(at)
                row["diverging"] = 1
                log.warning("step %d: diverging: %s (%d bad steps in a row)", at + 1, why, self.bad_in_row)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_step(at)
            self.nonfinite_in_row += 1
            self.skipped_total += 1
            row["skipped"] = 1
            log.warning("step %d: non-finite loss or gradient, optimizer step skipped (%d bad steps in a row)",
                        at + 1, self.bad_in_row)
        # The schedule advances on skipped steps too, so a step index always means the same learning rate.
        self.scheduler.step()
        self.step += 1
        return row

    def _bad_step(self, at: int) -> None:
        self.bad_in_row += 1
        if self.bad_since is None:
            self.bad_since = at

    def _evaluate(self) -> dict:
        if self.ema is None:
            return self.evaluate(self.model, self.step)
        with self.ema.applied(self.model):
            return self.evaluate(self.model, self.step)

    # ----- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        start = self.step
        bar = tqdm(total=cfg.train.max_steps, initial=start, desc=f"train[{self.objective.name}]",
                   disable=not cfg.train.progress or not self.is_main, dynamic_ncols=True, leave=False)
        last: dict = {}
        if self.evaluate is not None and cfg.train.eval_every > 0 and start == 0 and cfg.train.max_steps > 0:
            # The start of the in-training curves: the initial policy (with EMA on, the average equals it here).
            self.metrics.log(0, "eval", **self._evaluate())
        t0 = time.time()
        try:
            while self.step < cfg.train.max_steps:
                row = self._train_step()
                last = row
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                done = self.step >= cfg.train.max_steps
                if self.step % self.log_every == 0 or done or row.get("skipped") or row.get("diverging"):
                    self.metrics.log(self.step, "train", **row)
                if self.bad_in_row >= cfg.train.max_bad_steps:
                    raise self._stop()
                if self.evaluate is not None and cfg.train.eval_every > 0 and self.step % cfg.train.eval_every == 0 \
                        and not done:
                    self.metrics.log(self.step, "eval", **self._evaluate())
                if done or (cfg.train.ckpt_every > 0 and self.step % cfg.train.ckpt_every == 0):
                    self.save()
                elif preemption.agreed(self.device):   # SIGUSR1 / SIGTERM on any rank: checkpoint, all stop here
                    self.save()
                    raise preemption.Preempted(f"train stopped at step {self.step} of {cfg.train.max_steps}, "
                                               f"checkpoint written in {ckpt.checkpoint_root(self.run_dir)}")
        finally:
            bar.close()
        result = {"steps": self.step, "seconds": time.time() - t0, "skipped_steps": self.skipped_total,
                  "last": last}
        if self.ema is not None:
            self.ema.copy_to(self.model)  # the run's result is the averaged policy
        if self.evaluate is not None:
            final_eval = self.evaluate(self.model, self.step)
            self.metrics.log(self.step, "eval", **final_eval)
            result["eval"] = final_eval
        self.metrics.close()
        return result
