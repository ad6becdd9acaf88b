"""Reusing the work of another ``vidpo iterate`` run of the same seed.

Runs of a sweep often differ only in how rounds label and train. What the initial policy alone determines
(the seed labels, critic 0, the initial evaluation, round 1's generated pairs) is then identical by
construction, and ``reuse_run`` hard-links it instead of recomputing it. The key sets below say which
config keys leave which part unchanged; ``can_reuse`` tells a sweep whether a run may start from another.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from vidpo.config import ConfigError, RunConfig, load_config, resolve_path, to_dict
from vidpo.ipo.layout import TIMINGS_FILE
from vidpo.training import checkpoint as ckpt
from vidpo.utils import atomic
from vidpo.utils.lock import LOCK_FILE

log = logging.getLogger("vidpo")


# Keys that do not change what is shared: the seed labels, critic 0, the initial policy's evaluation and the
# pairs that round 1 generates (all made from the initial policy before any labelling or training).
ROUND_KEYS = ("train.*", "pref.*", "lora", "lora.*", "parallel.*", "cluster.*", "label.labeler", "label.human_file",
               "label.vlm", "label.vlm.*", "label.on_error", "critic.checkpoint", "critic.tie_margin",
               "critic.min_confidence",
               "critic.granularity", "critic.pointwise", "critic.desirable", "critic.undesirable", "iterate.rounds",
               "iterate.reference", "iterate.refine", "iterate.refine_*", "iterate.votes", "iterate.vote_*",
               "iterate.pce_*", "iterate.accumulate_pseudo", "iterate.pairing", "iterate.rank_fraction",
               "iterate.margin_fraction", "iterate.round_labeler")


# Keys that act from round 2 on only: a run differing in nothing else has the same round 1.
LATER_ROUND_KEYS = ("iterate.rounds", "iterate.reference", "iterate.refine", "iterate.refine_*", "iterate.votes",
                     "iterate.vote_*", "iterate.pce_*", "iterate.accumulate_pseudo")


# Keys that change round 1's generated pairs but not the seed labels, critic 0 or the initial evaluation.
ROUND_PAIR_KEYS = ("generate.num_pairs",)


# Keys that change how critic 0 is built and trained (the other critic.* keys act at labelling time, ROUND_KEYS)
# but not the seed labels, the initial evaluation or round 1's generated pairs (the initial policy makes them).
CRITIC_KEYS = ("critic.*",)


# Keys that label a prompt file's seed pairs (its seed labeller is the recipe's: people or the VLM judge), so they
# block sharing there, where on the shapes world (the oracle labels the seeds) they act on the rounds only.
PROMPT_SEED_LABEL_KEYS = ("label.labeler", "label.human_file", "label.vlm", "label.vlm.*", "label.on_error")


SEED_INPUTS = ("seed", "critic_0", "base_eval.safetensors", "samples/base.gif", "samples/base.png", TIMINGS_FILE,
               "base", "prompt_embeddings", "clips")


ROUND1_PAIRS = ("round_1/pairs/shards", "round_1/pairs/pairs.jsonl", "round_1/pairs/generate.json",
                 "round_1/pairs/frames", "round_1/pairs/videos", "round_1/pairs/decode.json", "round_1/pairs_eval")


def flat_config(cfg: RunConfig) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            out[prefix.rstrip(".")] = None if not node else "<section>"
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node
    walk(to_dict(cfg), "")
    return out


def differing_keys(a: RunConfig, b: RunConfig) -> list[str]:
    fa, fb = flat_config(a), flat_config(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k)


def same_weights(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two ``train.init_from`` values name the same weights (the same path, or equal file contents)."""
    if a == b:
        return True
    try:
        fa, fb = ckpt.find_weights(resolve_path(a)), ckpt.find_weights(resolve_path(b))
    except (FileNotFoundError, TypeError):
        return False
    return fa.stat().st_size == fb.stat().st_size and fa.read_bytes() == fb.read_bytes()


def reuse_run(cfg: RunConfig, out: Path, source: str | Path) -> list[str]:
    """Hard-link into ``out`` what run ``source`` already computed and this run would compute identically:
    the seed labels, critic 0, the initial policy's evaluation and round 1's generated pairs when the configs
    differ only in how rounds label and train (``ROUND_KEYS``; without round 1's pairs when the number of
    pairs per round differs too; without critic 0 when how it is trained differs, ``CRITIC_KEYS``), and all
    of round 1 when they differ only in keys that act from round 2 on (``LATER_ROUND_KEYS``). Files are
    written atomically (renamed over), so a
    link is never modified in place. Returns what was linked; raises ConfigError when nothing can be shared."""
    source = Path(source)
    if not (source / "config.yaml").exists():
        raise ConfigError(f"--reuse {source}: no config.yaml there (not a `vidpo iterate` run directory)")
    other = load_config(source / "config.yaml")
    differing = differing_keys(cfg, other)
    blocking = [k for k in differing
                if not any(fnmatch.fnmatch(k, p) for p in ROUND_KEYS + ROUND_PAIR_KEYS + CRITIC_KEYS)
                or (cfg.prompts.path and any(fnmatch.fnmatch(k, p) for p in PROMPT_SEED_LABEL_KEYS))]
    new_critic = any(not any(fnmatch.fnmatch(k, p) for p in ROUND_KEYS) for k in differing
                     if any(fnmatch.fnmatch(k, p) for p in CRITIC_KEYS))
    same_init = same_weights(cfg.train.init_from, other.train.init_from)
    if blocking or not same_init:
        raise ConfigError(f"--reuse {source}: the runs differ in {(blocking or ['train.init_from'])[:5]}, which "
                          "change the seed labels, critic 0 or round 1's pairs; nothing can be shared")
    differing = [k for k in differing if k != "train.init_from"]
    same_pairs = not any(k in ROUND_PAIR_KEYS for k in differing)
    whole_round = same_pairs and all(any(fnmatch.fnmatch(k, p) for p in LATER_ROUND_KEYS) for k in differing) \
        and (source / "round_1" / "round.json").exists()
    seed_inputs = [item for item in SEED_INPUTS if not (new_critic and item == "critic_0")]
    items = seed_inputs + (list(ROUND1_PAIRS) if same_pairs else []) \
        + (["round_1", "samples/round_1.gif", "samples/round_1.png"] if whole_round else [])
    linked = []
    for item in items:
        src = source / item
        if not src.exists():
            continue
        files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file() and atomic.TMP_MARK not in p.name
                                             and p.name != LOCK_FILE]   # a linked lock file would be shared
        for f in files:
            dst = out / f.relative_to(source)
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:   # another file system: copy
                shutil.copy2(f, dst)
        linked.append(item)
    log.info("reused from %s: %s", source, ", ".join(linked))
    return linked
