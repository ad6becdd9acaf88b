"""Pairs directories written by hand for the labelling tests: pixel-space pairs in the micro world's geometry
(``helpers.micro``: 4 frames of 8 x 8 at 4 fps; with ``label.segment_seconds=0.5``, 2 segments of 2 frames),
whose better video is visibly brighter in a segment, so that ``helpers.vlm_server.judge_by_brightness`` answers
like a competent VLM."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FRAMES, HEIGHT, WIDTH, SEGMENTS = 4, 8, 8, 2


def brightness_clips(targets: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second), each (N, 3, 4, 8, 8) in [-1, 1]: segment s of the better video is brighter by 0.6 when
    targets[b][s] is +1 (first) or -1 (second); 0 leaves two equally bright random textures."""
    gen = torch.Generator().manual_seed(seed)
    n = len(targets)
    first = torch.rand(n, 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 0.5 - 0.5
    second = torch.rand(n, 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 0.5 - 0.5
    per_segment = FRAMES // SEGMENTS
    for b, row in enumerate(targets):
        for s, y in enumerate(row):
            frames = slice(s * per_segment, (s + 1) * per_segment)
            if y == 1:
                first[b, :, frames] += 0.6
            elif y == -1:
                second[b, :, frames] += 0.6
    return first, second


def write_pairs_dir(root: Path, targets: list[list[int]], seed: int = 0, shard_size: int = 16) -> list[str]:
    """A pairs directory (shards + pairs.jsonl) of ``brightness_clips(targets)``; returns the pair ids."""
    first, second = brightness_clips(targets, seed)
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    lines, ids = [], []
    for start in range(0, len(targets), shard_size):
        shard = f"shards/shard_{start // shard_size:05d}.safetensors"
        save_file({"first": first[start:start + shard_size].contiguous(),
                   "second": second[start:start + shard_size].contiguous()}, str(root / shard))
        for row in range(min(shard_size, len(targets) - start)):
            pair_id = f"p{start + row:04d}"
            ids.append(pair_id)
            lines.append(json.dumps({"pair_id": pair_id, "shard": shard, "row": row,
                                     "caption": f"a square moving right, pair {start + row}"}))
    (root / "pairs.jsonl").write_text("".join(line + "\n" for line in lines))
    return ids


def vlm_overrides(base_url: str, *extra: str) -> list[str]:
    """``--set`` overrides that make the micro recipe label with the VLM at ``base_url`` (short timeouts)."""
    return ["label.labeler=vlm", f"label.vlm.base_url={base_url}", "label.vlm.model=fake-vlm",
            "label.vlm.timeout_s=2", "label.vlm.max_retries=1", "label.vlm.retry_backoff_s=0.01",
            "label.vlm.concurrency=4", "label.vlm.frames_per_segment=2", "label.vlm.image_size=16", *extra]


def blank_recipe(path: Path) -> Path:
    """A recipe file holding only a seed (the CLI verbs need one; the tests give the rest with --set)."""
    Path(path).write_text("seed: 0\n")
    return Path(path)
