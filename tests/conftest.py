"""Shared test settings: CPU only, few threads per worker, and a micro-sized world + model for fast
end-to-end tests (the demo's tiny preset is exercised by the demo test and the recipes)."""
import os

# Triton kernels run through the interpreter on CPU; it must be set before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs 2 workers on 2 cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# A model/world small enough that a few training steps take well under a second.
MICRO = [
    "model.width=32", "model.depth=2", "model.num_heads=2",
    "world.frames=4", "world.height=8", "world.width=8", "world.object_size=3", "world.fps=4",
    "train.batch_size=4", "train.log_every=1", "train.progress=false",
    "eval.num_samples=8", "eval.steps=2", "sample.steps=2", "sample.num_samples=4", "eval.grid_conditions=4",
    "generate.steps=2", "generate.num_pairs=8", "generate.heldout_pairs=4", "generate.shard_size=4",
    "label.segment_seconds=0.5",
]


@pytest.fixture
def micro_overrides():
    return list(MICRO)
