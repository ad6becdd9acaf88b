"""vidpo.kernels: fused preference-loss kernels (Triton, C++/OpenMP, CUDA) and their torch reference.

Public API (stable):
    dense_dpo_loss, flow_dpo_loss, kto_loss, flow_matching_loss  -- the losses (vidpo.kernels.losses)
    DPOLossOutput, KTOLossOutput                                   -- their outputs
    available_backends(device=None), resolve_backend(name, device) -- backend dispatch
Backends: "torch" (eager reference), "triton", "cpp", "cuda", or "auto" (see vidpo.kernels.dispatch).
"""
from .dispatch import BACKENDS, available_backends, backend_report, resolve_backend
from .losses import dense_dpo_loss, flow_dpo_loss, flow_matching_loss, kto_loss
from .reference import DPOLossOutput, KTOLossOutput

__all__ = [
    "BACKENDS",
    "DPOLossOutput",
    "KTOLossOutput",
    "available_backends",
    "backend_report",
    "dense_dpo_loss",
    "flow_dpo_loss",
    "flow_matching_loss",
    "kto_loss",
    "resolve_backend",
]
