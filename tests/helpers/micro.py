"""A model/world small enough that a few training steps take well under a second (the demo's tiny preset is
exercised by the demo test and the recipes). ``conftest.micro_overrides`` hands out a fresh copy per test."""

MICRO = [
    "model.width=32", "model.depth=2", "model.num_heads=2",
    "world.frames=4", "world.height=8", "world.width=8", "world.object_size=3", "world.fps=4",
    "train.batch_size=4", "train.log_every=1", "train.progress=false",
    "eval.num_samples=8", "eval.steps=2", "sample.steps=2", "sample.num_samples=4", "eval.grid_conditions=4",
    "generate.steps=2", "generate.num_pairs=8", "generate.heldout_pairs=4", "generate.shard_size=4",
    "label.segment_seconds=0.5",
]
