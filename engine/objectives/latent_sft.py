"""Flow-matching (SFT) objective on cached VAE latents and text embeddings (``data.source: latents``).

loss = mean over (B, C, T, H, W) of (v_theta(x_t, t, c) - (eps - x0))^2 with x_t = (1 - t) x0 + t eps,
x0 the cached latent (B, C, T, H, W), c the cached text embedding (B, L, D) (all zeros = the null
condition, used with probability ``flow.cond_dropout`` for classifier-free guidance) and t logit-normal
in [t_min, t_max] — the same loss as ``vidpo.objectives.sft`` on the shapes world.

Data come from ``vidpo.data.latents.LatentLoader``: its position in the sample stream is this objective's
``state_dict`` (so checkpoints carry it and a resumed run sees exactly the remaining samples). The noise,
timestep and dropout of a sample are drawn from the stream ``(seed, "latent_sft", position)`` of its global
stream position: they do not depend on the step, the micro-batch, the rank or the world size, so a sample
is trained on identically however the run is split or interrupted.
"""
from __future__ import annotations

from typing import Optional

import torch

from vidpo import kernels
from vidpo.config import RunConfig, resolve_path
from vidpo.data.latents import LatentLoader, LatentShardDataset
from vidpo.models import flow
from vidpo.utils.seeding import generator


def build_latent_loader(cfg: RunConfig, *, rank: Optional[int] = None,
                        world_size: Optional[int] = None) -> LatentLoader:
    """The loader of ``data.shards`` with the recipe's batch size, seed and prefetch settings."""
    dataset = LatentShardDataset(resolve_path(cfg.data.shards), on_error=cfg.data.on_bad_input)
    return LatentLoader(dataset, cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, rank=rank,
                        world_size=world_size, workers=cfg.data.workers, prefetch=cfg.data.prefetch)


class LatentSFTObjective:
    name = "sft"

    def __init__(self, cfg: RunConfig, device: torch.device, *, loader: Optional[LatentLoader] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.loader = loader or build_latent_loader(cfg, rank=rank, world_size=world_size)

    def _draws(self, positions: torch.Tensor, shape: tuple) -> tuple:
        """Per-sample (t, noise, dropped) from the stream of each sample's global position."""
        f = self.cfg.flow
        ts, noises, drops = [], [], []
        for position in positions.tolist():
            g = generator(self.cfg.seed, "latent_sft", position)
            ts.append(flow.sample_timesteps(1, g, logit_mean=f.logit_mean, logit_std=f.logit_std,
                                            t_min=f.t_min, t_max=f.t_max))
            noises.append(torch.randn(shape, generator=g))
            drops.append(torch.rand(1, generator=g) < f.cond_dropout)
        return torch.cat(ts), torch.stack(noises), torch.cat(drops)

    def micro_batch(self, step: int, micro: int) -> dict:
        batch = self.loader.next_batch()
        x0 = batch["latents"]
        t, noise, drop = self._draws(batch["positions"], tuple(x0.shape[1:]))
        cond = torch.where(drop[:, None, None], torch.zeros_like(batch["text_emb"]), batch["text_emb"])
        to = dict(device=self.device, non_blocking=True)
        return {"x0": x0.to(**to), "noise": noise.to(**to), "t": t.to(**to), "cond": cond.to(**to),
                "positions": batch["positions"], "indices": batch["indices"]}

    def loss(self, model, batch: dict):
        x_t = flow.interpolate(batch["x0"], batch["noise"], batch["t"])
        v = model(x_t, batch["t"], batch["cond"])
        loss = kernels.flow_matching_loss(v.float(), flow.velocity_target(batch["x0"], batch["noise"]).float())
        return loss, {}

    def state_dict(self) -> dict:
        return {"latent_loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state.get("latent_loader", {}))

    def close(self) -> None:
        self.loader.close()


