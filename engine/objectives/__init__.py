"""Training objectives. Each one draws its micro-batches from named random streams (so a step is
reproducible on its own) and computes its loss through ``vidpo.kernels``.

An objective implements:
  ``micro_batch(step, micro) -> batch``   everything random for that micro-batch, drawn deterministically
  ``loss(model, batch) -> (loss, metrics)``
  ``state_dict() / load_state_dict()``    its position in its data, saved in checkpoints
"""
from vidpo.objectives.sft import ShapesSFTObjective

__all__ = ["ShapesSFTObjective"]
