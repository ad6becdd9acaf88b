"""Flow-matching (SFT / pretraining) objective on the shapes world.

loss = mean over (B, C, T, H, W) of (v_theta(x_t, t, c) - (eps - x0))^2, with x_t = (1 - t) x0 + t eps,
t ~ logit-normal in [t_min, t_max] and the condition replaced by the null condition with probability
``flow.cond_dropout`` (so the model learns the unconditional velocity that classifier-free guidance needs).
The clips come from the world's renderer with the configured corruptions: that is how the base model of the
demo acquires the bad mode that preference optimisation later removes.
"""
from __future__ import annotations

import torch

from vidpo import kernels
from vidpo.config import RunConfig
from vidpo.models import flow
from vidpo.utils.seeding import generator


class ShapesSFTObjective:
    name = "sft"

    def __init__(self, cfg: RunConfig, world, device: torch.device):
        self.cfg = cfg
        self.world = world
        self.device = device

    def micro_batch(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        g = generator(cfg.seed, "data", step, micro)
        rendered, cond_ids = self.world.sample_batch(cfg.train.batch_size, g, corrupt=True)
        x0 = rendered.clips
        tokens = self.world.tokens(cond_ids)
        n = x0.shape[0]
        t = flow.sample_timesteps(n, g, logit_mean=cfg.flow.logit_mean, logit_std=cfg.flow.logit_std,
                                  t_min=cfg.flow.t_min, t_max=cfg.flow.t_max)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(n, generator=g) < cfg.flow.cond_dropout
        tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
        to = dict(device=self.device)
        return {"x0": x0.to(**to), "noise": noise.to(**to), "t": t.to(**to), "cond": tokens.to(**to)}

    def loss(self, model, batch: dict):
        x_t = flow.interpolate(batch["x0"], batch["noise"], batch["t"])
        v = model(x_t, batch["t"], batch["cond"])
        loss = kernels.flow_matching_loss(v.float(), flow.velocity_target(batch["x0"], batch["noise"]).float())
        return loss, {}

    def state_dict(self) -> dict:
        return {}  # every micro-batch is a pure function of (seed, step, micro): no position to save

    def load_state_dict(self, state: dict) -> None:
        pass
