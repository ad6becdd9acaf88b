"""Training: the loop every objective shares and what it needs around it.

trainer.py          the loop: micro-batches, AMP, clipping, NaN guard, checkpoints, exact resume
checkpoint.py       single-process checkpoints (safetensors + trainer state, checksums), written atomically
dist_checkpoint.py  multi-process checkpoints (torch.distributed.checkpoint), loadable at any world size
resume.py           what a resumed run may change: settings applied with a message or refused
divergence.py       the divergence guard: loss / gradient norm far above their running level
distributed.py      process groups (megatron-core parallel_state), the layout, gradient sync and clipping
ema.py              exponential moving average of the weights
metrics.py          metrics.jsonl + TensorBoard
modeling.py         a recipe -> device, world, policy model, segment ids
policy.py           the trainable policy (LoRA) and its reference forward, in one process or parallelized
"""
