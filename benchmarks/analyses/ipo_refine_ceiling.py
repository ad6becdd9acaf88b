"""How far can any critic refinement raise the critic's accuracy on a round's fresh pairs? (IPO, shapes world)

Dual-IPO's refinement retrains the critic on the seed labels plus labels of the round's new videos. This script
takes a finished ``vidpo iterate`` run and, for one round, retrains critic 0 offline on different label sets for
those same videos, then measures each critic against the oracle on the round's fresh pairs:

* ``before``        critic 0 (the critic that labels the round in ``ipo.yaml``);
* ``tta``           critic 0 scored as the mean over its symmetry views (what a view-ensemble teacher knows);
* ``retrain_seed``  the seed labels alone, another init / batch stream: the retraining lottery any
                    from-scratch refinement also draws;
* ``oracle_256``    seed labels + the oracle's labels of the round's generated pairs: a *perfect*
                    pseudo-labeller on exactly the pairs Dual-IPO labels (the ceiling of its signal);
* ``oracle_pool``   seed labels + the oracle's labels of every within-prompt pair of the round's videos;
* ``pseudo_pool_<p>[_soft][_d<K>]``  seed labels + the view-ensemble's (and K MC-dropout draws') labels of every
                    within-prompt pair, kept where its probability of the winner is >= p (weight 1, or 2p - 1);
* ``distill_<N>_<D>[_d<K>][_w<W>]``  critic 0 trained on for N more steps at 1/D of its learning rate, on the
                    seed labels + soft labels of every within-prompt pair from its own view ensemble (and K
                    MC-dropout draws per view): a win with weight W p and a loss with weight W (1 - p)
                    (self-distillation / consistency training, no oracle label);
* ``warm_<N>_<seed|votes|oracle>[_<D>]``  critic 0 trained on for N more steps at 1/D (10) of its learning rate, on
                    the seed labels alone / + the view-ensemble's confident labels of the generated pairs / + the
                    oracle's labels of those pairs (warm start: no retraining lottery);
* ``real_pairs[_w<W>]``  seed labels + (clean render of the prompt, generated video) pairs, the clean
                    render preferred, weight W: the real data IPO's regulariser trains on as the anchor.

Accuracy is reported twice: on the round's ``pairs_eval`` (the run's own fresh pairs, the number ``vidpo
iterate`` reports) and on every within-prompt pair of those eval videos ("pool", ~900 pairs, less noisy).
The oracle scores here are measurements; ``oracle_*`` rows are ceilings, not a method. Every variant also reports
``pool_gain``: its pool accuracy minus critic 0's, paired over the pool's pairs, with a 95% normal interval.

    python benchmarks/analyses/ipo_refine_ceiling.py runs/final2_ipo5/ipo/seed3 3 retrain_seed oracle_256 real_pairs \
        --json benchmarks/results/ipo_refine_ceiling.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vidpo.config import load_config
from vidpo.data.oracle import ShapesOracle
from vidpo.ipo.critic import PreferenceData, critic_accuracy, load_preference_data, train_critic, within_prompt_pairs
from vidpo.ipo.pool import read_pool
from vidpo.labeling.critic import Symmetries, score_videos
from vidpo.models.critic import load_critic
from vidpo.training.modeling import build_world, run_segment_ids, set_threads
from vidpo.utils.seeding import generator


class Ceiling:
    """One run's round: its videos, fresh pairs, seed labels and critic 0."""

    def __init__(self, run: Path, r: int, steps: int | None):
        self.cfg = load_config(run / "config.yaml")
        self.cfg.train.num_threads = 1
        if steps:
            self.cfg.critic.steps = steps
        set_threads(self.cfg)
        self.r = r
        self.world = build_world(self.cfg)
        self.oracle = ShapesOracle(self.world)
        self.seg = run_segment_ids(self.cfg)
        self.S = int(self.seg.max()) + 1
        self.sym = Symmetries(self.world, self.seg)
        self.critic0 = load_critic(run / "critic_0" / "critic.safetensors")
        self.seed = load_preference_data(run / "seed" / "pairs", self.S)
        rd = run / f"round_{r}"
        self.eval_pairs = load_preference_data(rd / "pairs_eval", self.S)
        ep = self.eval_pairs
        self.ev_videos, self.ev_cond = torch.cat([ep.first, ep.second]), torch.cat([ep.cond_ids, ep.cond_ids])
        ev_oracle = self.oracle_total(self.ev_videos, self.ev_cond)
        self.ef, self.es = within_prompt_pairs(self.world, self.ev_cond)
        self.ey = torch.sign(ev_oracle[self.ef] - ev_oracle[self.es])
        self.videos, self.cond = read_pool(rd / "pairs")
        self.truth = self.oracle_total(self.videos, self.cond)
        self.pf, self.ps = within_prompt_pairs(self.world, self.cond)

    def oracle_total(self, videos, cond) -> torch.Tensor:
        with torch.no_grad():
            return self.oracle.score(videos, cond).total.double()

    def pool_correct(self, scores: torch.Tensor) -> torch.Tensor:
        d, keep = scores[self.ef] - scores[self.es], self.ey != 0
        return (torch.sign(d[keep]) == self.ey[keep]).double()

    def pool_accuracy(self, scores: torch.Tensor) -> float:
        return round(float(self.pool_correct(scores).mean()), 4)

    def measure(self, critic) -> dict:
        acc = critic_accuracy(critic, self.eval_pairs, self.world, self.seg)["accuracy"]
        scores = score_videos(critic, self.ev_videos, self.ev_cond, self.world, self.seg).video.double()
        correct = self.pool_correct(scores)
        out = {"eval_pairs": round(acc, 4), "pool": round(float(correct.mean()), 4)}
        # The first critic measured (critic 0, in main) is the reference of every later pool_gain.
        if getattr(self, "before_correct", None) is not None:   # paired over the pool's pairs
            diff = correct - self.before_correct
            half = 1.96 * float(diff.std()) / len(diff) ** 0.5
            out["pool_gain"] = [round(float(diff.mean()), 4), round(float(diff.mean()) - half, 4),
                                round(float(diff.mean()) + half, 4)]
        else:
            self.before_correct = correct
        return out

    def view_scores(self, critic, videos, cond, dropout_draws: int = 0) -> torch.Tensor:
        """(V, n): the critic's scores over every symmetry view (and MC-dropout draws of each)."""
        out = []
        for k in range(len(self.sym)):
            kw = {"symmetries": self.sym, "view": k}
            out.append(score_videos(critic, videos, cond, self.world, self.seg, **kw).video.double())
            out += [score_videos(critic, videos, cond, self.world, self.seg, dropout_seed=1000 * k + m, **kw
                                 ).video.double() for m in range(dropout_draws)]
        return torch.stack(out)

    def pairs(self, first, second, labels, weights, videos_first=None) -> PreferenceData:
        """Pairs of the round's videos (``videos_first`` replaces the first videos, e.g. clean renders)."""
        keep = labels != 0
        first, second, labels, weights = first[keep], second[keep], labels[keep], weights[keep]
        n = len(first)
        lead = self.videos[first] if videos_first is None else videos_first[first]
        return PreferenceData(first=lead, second=self.videos[second], cond_ids=self.cond[first],
                              labels=labels[:, None].expand(n, self.S).clone().long(), video_labels=labels.long(),
                              weights=weights.float(), pair_ids=[f"p{i}" for i in range(n)])

    def train(self, extra: PreferenceData | None, stream=("critic",), *, warm: bool = False, steps: int = 0,
              lr_div: float = 10.0):
        """A critic trained on the seed labels (+ ``extra``): from scratch, or (``warm``) critic 0 trained on
        for ``steps`` more steps at 1/``lr_div`` of the learning rate."""
        data = self.seed if extra is None else PreferenceData.concat([self.seed, extra])
        cfg = copy.deepcopy(self.cfg)
        if warm:
            cfg.critic.steps, cfg.critic.lr, cfg.critic.warmup_steps = steps, cfg.critic.lr / lr_div, 0
        critic, _ = train_critic(cfg, data, self.world, self.seg, stream=stream,
                                 init=self.critic0 if warm else None)
        return critic

    def generated_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.videos.shape[0] // 2   # the pool is the generated pairs' first videos, then their second
        return torch.arange(n), torch.arange(n, 2 * n)

    def variant(self, name: str) -> dict:
        row: dict = {}
        t = time.time()
        if name == "retrain_seed":
            critic = self.train(None, stream=("critic", "again"))
        elif name == "oracle_256":
            first, second = self.generated_pairs()
            critic = self.train(self.pairs(first, second, torch.sign(self.truth[first] - self.truth[second]),
                                           torch.ones(len(first))))
        elif name.startswith("warm_"):   # warm_<steps>_<seed|votes|oracle>: critic 0 trained on
            _, steps, source, *rest = name.split("_")   # optional 4th part: the learning-rate divisor (10)
            first, second = self.generated_pairs()
            extra = None
            if source == "oracle":
                extra = self.pairs(first, second, torch.sign(self.truth[first] - self.truth[second]),
                                   torch.ones(len(first)))
            elif source == "votes":   # the view-ensemble's labels where it gives the winner >= 0.85
                mean = self.view_scores(self.critic0, self.videos, self.cond).mean(0)
                d = mean[first] - mean[second]
                labels = torch.sign(d) * (torch.sigmoid(d.abs()) >= 0.85)
                truth = torch.sign(self.truth[first] - self.truth[second])
                kept = labels != 0
                row["labels"] = {"kept": int(kept.sum()),
                                 "oracle_agreement": round(float((labels[kept] == truth[kept]).double().mean()), 4)}
                extra = self.pairs(first, second, labels, torch.ones(len(first)))
            critic = self.train(extra, warm=True, steps=int(steps), lr_div=float(rest[0]) if rest else 10.0)
        elif name.startswith("distill_"):   # distill_<steps>_<lr divisor>[_d<K>][_w<W>]: critic 0 trained on
            parts = name.split("_")[1:]      # toward its own view-ensemble's soft verdicts on every pair
            steps, lr_div = int(parts[0]), float(parts[1])
            draws = next((int(p[1:]) for p in parts if p.startswith("d") and p[1:].isdigit()), 0)
            scale = next((float(p[1:]) for p in parts if p.startswith("w")), 1.0)
            mean = self.view_scores(self.critic0, self.videos, self.cond, draws).mean(0)
            prob = torch.sigmoid(mean[self.pf] - mean[self.ps]).double()
            n = len(self.pf)
            soft = PreferenceData.concat([
                self.pairs(self.pf, self.ps, torch.ones(n), scale * prob),
                self.pairs(self.pf, self.ps, -torch.ones(n), scale * (1 - prob))])
            critic = self.train(soft, warm=True, steps=steps, lr_div=lr_div)
        elif name == "oracle_pool":
            critic = self.train(self.pairs(self.pf, self.ps, torch.sign(self.truth[self.pf] - self.truth[self.ps]),
                                           torch.ones(len(self.pf))))
        elif name.startswith("pseudo_pool_"):
            parts = name.split("_")[2:]
            threshold, soft = float(parts[0]), "soft" in parts
            draws = next((int(p[1:]) for p in parts if p.startswith("d") and p[1:].isdigit()), 0)
            mean = self.view_scores(self.critic0, self.videos, self.cond, draws).mean(0)
            d = mean[self.pf] - mean[self.ps]
            prob = torch.sigmoid(d.abs())
            labels = torch.sign(d) * (prob >= threshold)
            truth = torch.sign(self.truth[self.pf] - self.truth[self.ps])
            kept = labels != 0
            row["labels"] = {"kept": int(kept.sum()),
                             "oracle_agreement": round(float((labels[kept] == truth[kept]).double().mean()), 4)}
            weights = (2 * prob - 1) if soft else torch.ones(len(self.pf))
            critic = self.train(self.pairs(self.pf, self.ps, labels, weights.double()))
        elif name.startswith("real_pairs"):
            weight = float(name.split("_w")[1]) if "_w" in name else 1.0
            real = self.world.render(self.cond, generator(self.cfg.seed, "refine-real", self.r), corrupt=False).clips
            n = self.videos.shape[0]
            index = torch.arange(n)
            critic = self.train(self.pairs(index, index, torch.ones(n), torch.full((n,), weight),
                                           videos_first=real.float()))
        else:
            raise SystemExit(f"unknown variant {name!r} (module doc)")
        row.update(self.measure(critic), seconds=round(time.time() - t, 1))
        return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished vidpo iterate run (one seed's directory)")
    p.add_argument("round", type=int, help="round whose videos and fresh pairs are used (2 or 3)")
    p.add_argument("variants", nargs="*", help="retrain_seed, oracle_256, oracle_pool, pseudo_pool_<p>, real_pairs")
    p.add_argument("--steps", type=int, default=None, help="critic.steps of every retraining (default: the run's)")
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = p.parse_args(argv)
    c = Ceiling(args.run, args.round, args.steps)
    result = {"run": str(args.run), "round": args.round, "critic_steps": c.cfg.critic.steps,
              "videos": int(c.videos.shape[0]), "pool_pairs": len(c.ef), "before": c.measure(c.critic0),
              "tta": {"pool": c.pool_accuracy(c.view_scores(c.critic0, c.ev_videos, c.ev_cond).mean(0))}}
    print("before", result["before"], "tta", result["tta"], flush=True)
    for name in args.variants:
        result[name] = c.variant(name)
        print(name, result[name], flush=True)
    result.update(command=" ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
                  torch=torch.__version__, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
