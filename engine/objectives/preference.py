"""Preference objectives on labelled pairs: Flow-DPO, DenseDPO and Diffusion-KTO (+ SFT regularizer).

For a micro-batch of B pairs (first, second) with per-segment labels y (B, S):
  * one timestep t (B,) and one noise eps (B, C, T, H, W) per pair, shared by both videos (DESIGN.md 1);
  * the policy runs ONCE on the concatenated batch [first; second] (2B rows), the reference without
    gradient on the same inputs (the policy with LoRA disabled, or a frozen copy);
  * the loss is ``vidpo.kernels.dense_dpo_loss`` with the x0/noise variant (the fused kernel forms the
    velocity target eps - x0 itself; ``pref.label_smoothing`` makes it conservative DPO), or ``kto_loss``
    for KTO;
  * optionally + ``pref.sft_weight`` * flow-matching loss on real clips of the same conditions (IPO's
    real-video regularization) and/or on the preferred videos.

Flow-DPO uses the whole-video label (majority of segment labels) as one segment; DenseDPO uses the segment
labels. KTO turns each non-tie pair into one desirable (the winner) and one undesirable video.

Which pairs a micro-batch holds is a pure function of (seed, step, micro): the pair order is a seeded
permutation per epoch, so a resumed run reads exactly the pairs the uninterrupted run would have.

Distributed (``parallel``, a ``vidpo.training.distributed.ParallelContext``): every rank draws the same global
micro-batch (train.batch_size pairs, the same t and noise as one process) and keeps its data-parallel rows;
the model returns this rank's context-parallel frames, and the loss reduces its per-segment sums over the
CP group with the local segment ids. Each DP rank's loss is weighted by its share of the global loss'
normaliser (DenseDPO: non-tie tokens; KTO / SFT: videos) and all-reduced over DP, so every rank holds the
global loss and gradients summed over ranks equal the single-process gradient.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from vidpo import kernels
from vidpo.config import RunConfig
from vidpo.data.pairs import PairRecord, ShardReader
from vidpo.models import flow
from vidpo.parallel.mappings import all_reduce_sum_detached, reduce_from_group
from vidpo.training.distributed import weighted_means
from vidpo.utils.seeding import generator

log = logging.getLogger("vidpo")

ReferenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RealLatentsOfRecords = Callable[[list, torch.Generator], torch.Tensor]
"""``(records, generator) -> (n, C, T, H, W)``: real clips (latents) of the records' prompts."""


class PreferenceObjective:
    """``conditioning`` turns the pairs' prompts into the model's conditions (``vidpo.training.conditioning``);
    ``real_latents(records, generator)`` gives real clips of the same prompts for the regularizer on real
    videos (``pref.sft_source`` real / both)."""

    def __init__(self, cfg: RunConfig, conditioning, device: torch.device, records: list[PairRecord],
                 reader: ShardReader, segment_ids: torch.Tensor, reference: ReferenceFn, *, parallel=None,
                 process=None, real_latents: Optional[RealLatentsOfRecords] = None):
        self.cfg = cfg
        # the model adapter's diffusion process (interpolate / training_target / sample_timesteps),
        # e.g. CogVideoX's v-prediction DDPM; None keeps the rectified flow (and the fused x0/noise kernel path).
        self.process = process
        self.parallel = parallel
        self.name = cfg.train.objective
        if self.name not in ("flow_dpo", "dense_dpo", "kto"):
            raise ValueError(f"PreferenceObjective does not handle objective '{self.name}'")
        self.conditioning = conditioning
        self.real_latents = real_latents
        self.device = device
        self.reader = reader
        self.reference = reference
        self.segment_ids = segment_ids.to(device)
        self.num_segments = int(segment_ids.max()) + 1
        if self.name == "kto":
            # KTO needs a winner and a loser: pairs whose whole-video label is a tie carry no signal.
            records = [r for r in records if _video_label(r) != 0]
        if not records:
            raise ValueError(f"no usable labelled pairs for objective '{self.name}' (all ties?)")
        self.records = records

    # ----- data --------------------------------------------------------------------------------------
    def _pair_indices(self, step: int, micro: int) -> list[int]:
        bsz, n = self.cfg.train.batch_size, len(self.records)
        start = (step * self.cfg.train.grad_accum + micro) * bsz
        out, perms = [], {}
        for pos in range(start, start + bsz):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=generator(self.cfg.seed, "pairs", epoch)).tolist()
            out.append(perms[epoch][offset])
        return out

    def micro_batch(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        recs = [self.records[i] for i in self._pair_indices(step, micro)]
        # Under data parallel, only this rank's pairs are read; random draws stay those of the whole batch.
        rows = self.parallel.dp_rows(len(recs)) if self.parallel is not None else slice(None)
        all_recs, recs = recs, recs[rows]
        first = torch.stack([self.reader.get(r, "first") for r in recs]).float()
        second = torch.stack([self.reader.get(r, "second") for r in recs]).float()
        if self.name == "dense_dpo":
            labels = torch.tensor([r.labels for r in recs], dtype=torch.long)
        else:
            labels = torch.tensor([[_video_label(r)] for r in recs], dtype=torch.long)
        g = generator(cfg.seed, "pref-noise", step, micro)
        b = len(all_recs)
        if self.process is not None:
            t = self.process.sample_timesteps(b, g, cfg.flow)
        else:
            t = flow.sample_timesteps(b, g, logit_mean=cfg.flow.logit_mean, logit_std=cfg.flow.logit_std,
                                      t_min=cfg.flow.t_min, t_max=cfg.flow.t_max)
        noise = torch.randn((b,) + tuple(first.shape[1:]), generator=g)
        batch = {"first": first, "second": second, "tokens": self.conditioning.for_records(recs), "labels": labels,
                 "t": t[rows], "noise": noise[rows]}
        if cfg.pref.sft_weight > 0 and cfg.pref.sft_source in ("real", "both"):
            gs = generator(cfg.seed, "pref-sft", step, micro)
            if self.real_latents is None:
                raise ValueError("pref.sft_source real / both needs real clips of the pairs' prompts")
            real = self.real_latents(all_recs, gs)
            batch["real"] = real[rows]
            if self.process is not None:
                batch["real_t"] = self.process.sample_timesteps(b, gs, None)[rows]
            else:
                batch["real_t"] = flow.sample_timesteps(b, gs, logit_mean=cfg.flow.logit_mean,
                                                        logit_std=cfg.flow.logit_std)[rows]
            batch["real_noise"] = torch.randn(real.shape, generator=gs)[rows]
        return {k: v.to(self.device) for k, v in batch.items()}

    # ----- loss --------------------------------------------------------------------------------------
    def loss(self, model, batch: dict):
        cfg = self.cfg
        x0 = torch.cat([batch["first"], batch["second"]])
        t2 = torch.cat([batch["t"], batch["t"]])
        tokens2 = torch.cat([batch["tokens"], batch["tokens"]])
        noise2 = torch.cat([batch["noise"], batch["noise"]])
        x_t = (_FLOW if self.process is None else self.process).interpolate(x0, noise2, t2)
        v_theta = model(x_t, t2, tokens2)
        with torch.no_grad():
            v_ref = self.reference(x_t, t2, tokens2)
        # Context parallel: both models returned this rank's latent frames; the targets follow.
        frames, group = self._local_frames(model, x0.shape[2])
        target = None
        if self.process is not None:  # the adapter's own target; otherwise the kernel forms eps - x0 itself
            target = self.process.training_target(x0, noise2, t2)[:, :, frames].to(v_theta.dtype)
        x0, noise = x0[:, :, frames], batch["noise"][:, :, frames]
        if target is not None:
            x0 = noise = None
        dtype = v_theta.dtype
        metrics: dict[str, float] = {}
        weights: dict[str, float] = {}      # data-parallel weight of each metric (its local count)
        if self.name == "kto":
            desirable = torch.cat([batch["labels"][:, 0] > 0, batch["labels"][:, 0] < 0])
            dp_group = self.parallel.dp_group if self._dp > 1 else None
            out = kernels.kto_loss(v_theta, v_ref.to(dtype), target, desirable, cfg.pref.beta,
                                   lambda_d=cfg.pref.kto_lambda_desirable, lambda_u=cfg.pref.kto_lambda_undesirable,
                                   backend=cfg.pref.loss_backend, x0=_cast(x0, dtype), noise=_cast(noise, dtype),
                                   group=group, dp_group=dp_group)
            loss = out.loss
            metrics["kto_loss"] = out.loss.item()
            metrics["reward_desirable"] = out.reward[desirable].mean().item()
            metrics["reward_undesirable"] = out.reward[~desirable].mean().item()
            metrics["ref_point"] = float(out.ref_point)
            n = float(desirable.numel())
            weights.update(kto_loss=n, reward_desirable=float(desirable.sum()),
                           reward_undesirable=float((~desirable).sum()), ref_point=1.0)
            share = 1.0 / self._dp      # every rank holds the same number of videos
        else:
            full_ids = self.segment_ids if self.name == "dense_dpo" else torch.zeros_like(self.segment_ids)
            out = kernels.dense_dpo_loss(v_theta, v_ref.to(dtype), target, batch["labels"], full_ids[frames],
                                         cfg.pref.beta, backend=cfg.pref.loss_backend, x0=_cast(x0, dtype),
                                         noise=_cast(noise, dtype), group=group,
                                         label_smoothing=cfg.pref.label_smoothing)
            loss = out.loss
            nontie = batch["labels"] != 0
            metrics["dpo_loss"] = out.loss.item()
            metrics["accuracy"] = float(out.accuracy)
            metrics["margin_mean"] = out.margin[nontie].mean().item() if nontie.any() else 0.0
            metrics["nontie_frac"] = nontie.double().mean().item()
            share = self._dpo_share(full_ids, batch["labels"]) if self._dp > 1 else 1.0
            weights.update(dpo_loss=share, accuracy=float(nontie.sum()), margin_mean=float(nontie.sum()),
                           nontie_frac=float(nontie.numel()))
        if self._dp > 1:
            loss = loss * share
        if cfg.pref.sft_weight > 0:
            sft = self._sft_loss(model, batch, frames, group)
            loss = loss + cfg.pref.sft_weight * (sft / self._dp if self._dp > 1 else sft)
            metrics["sft_loss"] = sft.item()
            weights["sft_loss"] = 1.0
        if self._dp > 1:
            # Each rank's loss is its share of the global loss: the sum (identity backward) is the global
            # loss on every rank, and the gradients the training loop sums over ranks are the global ones.
            loss = reduce_from_group(loss, self.parallel.dp_group)
            metrics = weighted_means({k: (v, weights[k]) for k, v in metrics.items()}, self.parallel.dp_group,
                                     device=loss.device)
        return loss, metrics

    @property
    def _dp(self) -> int:
        return 1 if self.parallel is None else self.parallel.dp

    def _local_frames(self, model, frames: int):
        """(slice of this rank's latent frames, the context-parallel group or None)."""
        if self.parallel is None or self.parallel.cp == 1:
            return slice(None), None
        return model.local_frames(frames), self.parallel.cp_group

    def _dpo_share(self, segment_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """This rank's fraction of the global batch's DenseDPO normaliser sum_{y != 0} tokens_s."""
        frames_per_segment = torch.bincount(segment_ids.cpu(), minlength=labels.shape[1]).to(torch.float64)
        local = (frames_per_segment[None, :] * (labels.cpu() != 0)).sum()
        total = float(all_reduce_sum_detached(local.to(labels.device), self.parallel.dp_group))
        return float(local) / total if total > 0 else 0.0

    def _sft_loss(self, model, batch: dict, frames=slice(None), group=None) -> torch.Tensor:
        """Flow matching on real clips and/or winners (the IPO regularizer)."""
        parts = []
        src = self.cfg.pref.sft_source
        if src in ("real", "both"):
            process = _FLOW if self.process is None else self.process
            x_t = process.interpolate(batch["real"], batch["real_noise"], batch["real_t"])
            v = model(x_t, batch["real_t"], batch["tokens"])
            target = process.training_target(batch["real"], batch["real_noise"], batch["real_t"])[:, :, frames]
            parts.append(kernels.flow_matching_loss(v.float(), target.float(), group=group))
        if src in ("winners", "both"):
            win_first = (batch["labels"].sum(1) >= 0)[:, None, None, None, None]
            winners = torch.where(win_first, batch["first"], batch["second"])
            process = _FLOW if self.process is None else self.process
            x_t = process.interpolate(winners, batch["noise"], batch["t"])
            v = model(x_t, batch["t"], batch["tokens"])
            target = process.training_target(winners, batch["noise"], batch["t"])[:, :, frames]
            parts.append(kernels.flow_matching_loss(v.float(), target.float(), group=group))
        return sum(parts) / len(parts)

    def state_dict(self) -> dict:
        return {"num_records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        n = state.get("num_records")
        if n is not None and n != len(self.records):
            log.warning("resuming with %d usable pairs where the checkpoint had %d: the pair order differs "
                        "from the uninterrupted run", len(self.records), n)


class _RectifiedFlow:
    """The toy DiT's process (DESIGN.md section 1), in the interface of the model adapters' hooks."""

    @staticmethod
    def interpolate(x0, noise, t):
        return flow.interpolate(x0, noise, t)

    @staticmethod
    def training_target(x0, noise, t):
        return flow.velocity_target(x0, noise)


_FLOW = _RectifiedFlow()


class _TimeRange:
    """The flow-config fields an adapter's ``sample_timesteps`` reads (standard logit-normal in a range)."""

    def __init__(self, t_min: float, t_max: float):
        self.logit_mean, self.logit_std, self.t_min, self.t_max = 0.0, 1.0, t_min, t_max


def _cast(x: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if x is None else x.to(dtype)


def _video_label(rec: PairRecord) -> int:
    if rec.video_label is not None:
        return int(rec.video_label)
    s = sum(rec.labels or [])
    return (s > 0) - (s < 0)


@torch.no_grad()
def implicit_accuracy(model, reference: ReferenceFn, conditioning, records: list[PairRecord], reader: ShardReader,
                      segment_ids: torch.Tensor, *, beta: float, seed: int, t_min: float, t_max: float,
                      device, batch_size: int = 32, backend: str = "auto", dense: bool = True) -> Optional[float]:
    """Fraction of non-tie (pair, segment) labels the policy's implicit reward agrees with, on fixed
    (seed-derived) timesteps and noise. On the toy world this tracks fitting of the labels, not quality."""
    if not records:
        return None
    # a diffusers adapter's own process (timesteps, forward process, target); None: rectified flow.
    process = model if getattr(model, "training_target", None) is not None else None
    correct = total = 0.0
    seg = segment_ids.to(device) if dense else torch.zeros_like(segment_ids).to(device)
    for start in range(0, len(records), batch_size):
        recs = records[start:start + batch_size]
        first = torch.stack([reader.get(r, "first") for r in recs]).float().to(device)
        second = torch.stack([reader.get(r, "second") for r in recs]).float().to(device)
        labels = torch.tensor([r.labels if dense else [_video_label(r)] for r in recs], dtype=torch.long,
                              device=device)
        tokens = conditioning.for_records(recs).to(device)
        g = generator(seed, "implicit-acc", start)
        if process is not None:
            t = process.sample_timesteps(len(recs), g, _TimeRange(t_min, t_max)).to(device)
        else:
            t = flow.sample_timesteps(len(recs), g, t_min=t_min, t_max=t_max).to(device)
        noise = torch.randn(first.shape, generator=g).to(device)
        x0 = torch.cat([first, second])
        t2, tok2 = torch.cat([t, t]), torch.cat([tokens, tokens])
        noise2 = torch.cat([noise, noise])
        x_t = (_FLOW if process is None else process).interpolate(x0, noise2, t2)
        target = None if process is None else process.training_target(x0, noise2, t2).float()
        out = kernels.dense_dpo_loss(model(x_t, t2, tok2).float(), reference(x_t, t2, tok2).float(), target, labels,
                                     seg, beta, backend=backend, x0=None if process else x0,
                                     noise=None if process else noise)
        n = int(out.n_nontie)
        correct += float(out.accuracy) * n
        total += n
    return correct / total if total else None
