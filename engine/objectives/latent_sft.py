"""The denoising (SFT) objective on cached VAE latents and text embeddings (``data.source: latents``), in the
model's own forward process and target.

loss = mean over (B, C, T, H, W) of (pred_theta(x_t, t, c) - target)^2, x0 the cached latent (B, C, T, H, W), c the
cached text embedding (B, L, D) (all zeros = the null condition, used with probability ``flow.cond_dropout`` for
classifier-free guidance), eps Gaussian noise and t engine time in [0, 1]:
  * the DiT (no hooks): rectified flow, x_t = (1 - t) x0 + t eps, target eps - x0, t logit-normal in
    [t_min, t_max] — the same loss as ``vidpo.objectives.sft`` on the shapes world;
  * a diffusers adapter (``process``): its hooks ``interpolate`` / ``training_target`` / ``sample_timesteps``
    (``vidpo.models.adapters``): Wan's rectified flow (the same draws and loss as the DiT's), CogVideoX's
    v-prediction DDPM (x_k = alpha_k x0 + sigma_k eps, target v = alpha_k eps - sigma_k x0, k uniform over its
    training timesteps in [t_min, t_max]), as the preference objectives use them.

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
                 rank: Optional[int] = None, world_size: Optional[int] = None, process=None):
        """``process``: the model adapter whose diffusion-process hooks (``interpolate``, ``training_target``,
        ``sample_timesteps``) define x_t, the target and the timesteps; an object without them (the DiT, or
        None) means rectified flow."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.process = process if getattr(process, "training_target", None) is not None else None
        self.loader = loader or build_latent_loader(cfg, rank=rank, world_size=world_size)

    def _draws(self, positions: torch.Tensor, shape: tuple) -> tuple:
        """Per-sample (t, noise, dropped) from the stream of each sample's global position."""
        f = self.cfg.flow
        ts, noises, drops = [], [], []
        for position in positions.tolist():
            g = generator(self.cfg.seed, "latent_sft", position)
            if self.process is None:
                ts.append(flow.sample_timesteps(1, g, logit_mean=f.logit_mean, logit_std=f.logit_std,
                                                t_min=f.t_min, t_max=f.t_max))
            else:
                ts.append(self.process.sample_timesteps(1, g, f).float())
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
        x0, noise, t = batch["x0"], batch["noise"], batch["t"]
        if self.process is None:
            x_t, target = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
        else:
            x_t, target = self.process.interpolate(x0, noise, t), self.process.training_target(x0, noise, t)
        pred = model(x_t, t, batch["cond"])
        loss = kernels.flow_matching_loss(pred.float(), target.float())
        return loss, {}

    def state_dict(self) -> dict:
        return {"latent_loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state.get("latent_loader", {}))

    def close(self) -> None:
        self.loader.close()


