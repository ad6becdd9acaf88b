"""The stages of a whole job from one recipe, as ``vidpo`` commands: what ``vidpo launch`` runs, in order.

    stage     command(s)                                                    processes
    cache     vidpo cache RECIPE --out SHARDS                              every GPU (torchrun)
              (data.source latents with a cache.manifest; SHARDS = data.shards, default OUT/cache)
    generate  vidpo generate RECIPE --out OUT/pairs                         every GPU (torchrun)
              vidpo generate RECIPE --out OUT/pairs_heldout --split heldout (generate.heldout_pairs > 0)
    label     vidpo label RECIPE --pairs OUT/pairs (and OUT/pairs_heldout)  every GPU (each rank labels its
                                                                           share; a VLM's concurrency is shared
                                                                           out over the ranks)
    train     vidpo train RECIPE --out OUT --set pref.pairs=OUT/pairs      every GPU (the preference
                                                                           objectives; the others: one process)
    eval      vidpo run RECIPE --out OUT                                    every GPU

The folders are those of ``vidpo run --out OUT``, so the last stage, ``vidpo run`` itself, finds the pairs,
their labels and the trained weights done and does what is left: the evaluation, ``summary.json`` and
``report.html``. A recipe that trains from cached latents is ``cache -> train``; any other objective (SFT,
distillation) is ``train``. ``--verb STAGE`` launches one stage alone (it then reads what the recipe names,
e.g. ``pref.pairs`` for train); ``--verb run`` is ``vidpo run`` in one step, ``--verb iterate`` the IPO rounds
(``vidpo iterate`` on every GPU: each round's generation, labels, training and evaluation are sliced over the ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from vidpo.config import ConfigError, RunConfig
from vidpo.config.choices import PREFERENCE_OBJECTIVES

ALL, ONE = "all", "one"
STAGES = ("cache", "generate", "label", "train", "eval")
VERBS = ("job",) + STAGES + ("run", "iterate")
"""What ``vidpo launch --verb`` accepts: the whole job, one of its stages, ``vidpo run`` or ``vidpo iterate``."""


@dataclass
class Step:
    """One stage of a job: its ``vidpo`` commands (argv after ``vidpo``), run on every GPU or in one process."""

    stage: str
    commands: list[list[str]]
    ranks: str = ALL
    produces: dict = field(default_factory=dict)
    """Recipe keys whose paths this stage writes (``pref.pairs``, ``data.shards``): later stages need not find
    them on disk before the job starts."""


def job_steps(cfg: RunConfig, recipe: str, overrides: Sequence[str], out: str, verb: str = "job") -> list[Step]:
    """The steps of ``verb`` (module docstring) for ``recipe`` loaded as ``cfg`` with ``overrides``, into ``out``."""
    if verb not in VERBS:
        raise ConfigError(f"--verb {verb!r} is not one of {list(VERBS)}")
    sets = [a for o in overrides for a in ("--set", o)]
    out = str(out)
    if verb == "run":
        return [Step("run", [["run", recipe, "--out", out, *sets]])]
    if verb == "iterate":
        return [Step("iterate", [["iterate", recipe, "--out", out, *sets]])]
    whole = verb == "job"
    steps: list[Step] = []
    if cfg.data.source == "latents":
        shards = cfg.data.shards or f"{out}/cache"
        if cfg.cache.manifest:
            steps.append(Step("cache", [["cache", recipe, "--out", shards, *sets]], produces={"data.shards": shards}))
        extra = [] if cfg.data.shards else ["--set", f"data.shards={shards}"]
        steps.append(Step("train", [["train", recipe, "--out", out, *sets, *extra]], ONE))
    elif cfg.train.objective in PREFERENCE_OBJECTIVES:
        splits = [("train", f"{out}/pairs")]
        if cfg.generate.heldout_pairs > 0:
            splits.append(("heldout", f"{out}/pairs_heldout"))
        pairs = splits[0][1]
        steps.append(Step("generate", [["generate", recipe, "--out", d, *(["--split", s] if s != "train" else []),
                                        *sets] for s, d in splits], produces={"generated": pairs}))
        steps.append(Step("label", [["label", recipe, "--pairs", d, *sets] for _, d in splits],
                          produces={"pref.pairs": pairs}))
        pairs_set = ["--set", f"pref.pairs={pairs}"] if whole else []
        steps.append(Step("train", [["train", recipe, "--out", out, *sets, *pairs_set]]))
        steps.append(Step("eval", [["run", recipe, "--out", out, *sets]]))
    else:   # SFT on the shapes world, consistency distillation: one process (vidpo.config.run)
        steps.append(Step("train", [["train", recipe, "--out", out, *sets]], ONE))
    if whole:
        return steps
    chosen = [s for s in steps if s.stage == verb]
    if not chosen:
        raise ConfigError(f"--verb {verb}: this recipe's job has no {verb} stage (its stages: "
                          f"{' -> '.join(s.stage for s in steps)})")
    return chosen
