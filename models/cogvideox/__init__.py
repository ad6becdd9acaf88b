"""CogVideoX through diffusers: ``CogVideoXAdapter`` (v-prediction DDPM; see ``vidpo.models.adapters``); its parallel
form (TP / CP / FSDP) is ``vidpo.models.cogvideox.parallelize``."""
from vidpo.models.cogvideox.model import (
    COGVIDEOX_SCHEDULER,
    CogVideoXAdapter,
    make_scheduler,
    tiny_cogvideox_transformer,
)

__all__ = ["COGVIDEOX_SCHEDULER", "CogVideoXAdapter", "make_scheduler", "tiny_cogvideox_transformer"]
