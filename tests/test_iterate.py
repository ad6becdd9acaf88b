"""Dual-IPO (votes, implicit rewards, PCE in float64) and `vidpo iterate` on the micro world: rounds, summary,
report, KTO rounds, the fixed-base reference, resuming after a kill, and bad configs."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers.models import perturb_, save_perturbed_base
from vidpo.labeling.critic import build_critic, score_videos
from vidpo.ipo.critic import pool_accuracy, within_prompt_pairs
from vidpo.ipo.pool import read_pool
from vidpo.ipo.dual import (critic_votes, implicit_rewards, indexed_votes, load_pseudo_labels, mode_vote,
                            preference_certainty, read_pseudo_rows, video_implicit_rewards)
from vidpo.ipo.rounds import iterate
from vidpo.ipo.layout import open_run
from vidpo.training.modeling import build_policy, build_world
from vidpo.models.critic import load_critic
from vidpo.config import ConfigError, load_config


# Two intra-op threads on two busy cores make these tiny models ~50x slower (OpenMP oversubscription).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_mode_vote_majority_and_contested():
    votes = torch.tensor([[1, -1, 0, 1, 1],
                          [1, -1, 0, -1, 0],
                          [1, 1, 0, 0, -1]])          # (K=3, B=5)
    label, share = mode_vote(votes)
    assert label.tolist() == [1, -1, 0, 0, 0]          # pairs 3 and 4: every label once -> no majority
    torch.testing.assert_close(share, torch.tensor([1.0, 2 / 3, 1.0, 0.0, 0.0], dtype=torch.float64))


def tiny_critic(micro_overrides):
    """The micro world and an untrained one-block critic (seeded)."""
    cfg = load_config(None, micro_overrides + ["critic.width=16", "critic.num_heads=2", "critic.depth=1"])
    world = build_world(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return world, build_critic(cfg, world).eval()


def test_critic_votes_deterministic_views_and_confidence(micro_overrides):
    world, critic = tiny_critic(micro_overrides)
    g = torch.Generator().manual_seed(2)
    first, second = torch.rand(6, 3, 4, 8, 8, generator=g) * 2 - 1, torch.rand(6, 3, 4, 8, 8, generator=g) * 2 - 1
    cond, seg = world.condition(torch.arange(6) * 5), torch.tensor([0, 0, 1, 1])
    kw = dict(passes=4, seed=7)
    a = critic_votes(critic, first, second, cond, world, seg, **kw)
    b = critic_votes(critic, first, second, cond, world, seg, **kw)
    assert torch.equal(a.passes, b.passes) and a.labels.shape == (6, 2)
    assert torch.equal(a.labels, a.video_labels[:, None].expand(-1, 2))          # 'video' granularity
    plain = critic_votes(critic, first, second, cond, world, seg, passes=3, seed=7, dropout=False, augment=False)
    assert (plain.passes == plain.passes[0]).all() and (plain.agreement[plain.video_labels != 0] == 1).all()
    d = score_videos(critic, first, cond, world, seg).video - score_videos(critic, second, cond, world, seg).video
    assert torch.equal(plain.video_labels, torch.sign(d).long())
    sure = critic_votes(critic, first, second, cond, world, seg, passes=3, seed=7, min_confidence=0.999999)
    assert (sure.video_labels == 0).all()                                          # nobody is that sure: ties


def test_indexed_votes_equal_votes_on_the_materialised_pairs(micro_overrides):
    """Votes over index pairs of one video set (each video scored once per pass) = votes over the pairs copied out."""
    world, critic = tiny_critic(micro_overrides)
    videos = torch.rand(9, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cond, seg = world.condition(torch.tensor([0, 5, 0, 5, 0, 9, 5, 9, 0])), torch.tensor([0, 0, 1, 1])
    first, second = within_prompt_pairs(world, cond)
    assert len(first) == 6 + 3 + 1    # prompts with 4, 3 and 2 videos
    kw = dict(passes=3, seed=7, dropout=False, granularity="segment")
    indexed = indexed_votes(critic, videos, cond, first, second, world, seg, **kw)
    copied = critic_votes(critic, videos[first], videos[second], cond[first], world, seg, **kw)
    for field in ("labels", "video_labels", "agreement", "passes"):
        assert torch.equal(getattr(indexed, field), getattr(copied, field)), field
    # keep_fraction: each pass votes on its half of the pairs with the largest |score difference| only.
    half = indexed_votes(critic, videos, cond, first, second, world, seg, passes=1, seed=7, dropout=False,
                         augment=False, keep_fraction=0.5)
    scores = score_videos(critic, videos, cond, world, seg).video
    gap = (scores[first] - scores[second]).abs()
    assert torch.equal(half.video_labels != 0, gap > gap.median()) and int((half.video_labels != 0).sum()) == 5
    with pytest.raises(ValueError, match="vote_keep_fraction"):
        indexed_votes(critic, videos, cond, first, second, world, seg, passes=1, seed=7, keep_fraction=1.5)


def test_preference_certainty_float64_reference():
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    y = torch.tensor([1, -1, 1, 0, -1, 1, 1, -1, 1])
    pce, q, tau = preference_certainty(r1, r2, y)
    rewards = torch.cat([r1, r2])
    assert q == pytest.approx(float(rewards.mean())) and tau == pytest.approx(float(rewards.std(unbiased=False)))
    for i in range(9):
        if y[i] == 0:
            assert pce[i] == 0
            continue
        rw, rl = (r1[i], r2[i]) if y[i] > 0 else (r2[i], r1[i])
        expected = 0.5 * (1 / (1 + torch.exp(-(rw - q) / tau)) + 1 / (1 + torch.exp(-(q - rl) / tau)))
        torch.testing.assert_close(pce[i], expected)
        assert bool(pce[i] > 0.5) == bool(rw > rl)       # the keep rule = the policy agrees with the vote
    # Scale-free with tau = std: multiplying every reward (i.e. beta) by 7 changes nothing.
    torch.testing.assert_close(preference_certainty(7 * r1, 7 * r2, y)[0], pce)
    fixed = preference_certainty(r1, r2, y, temperature=0.5)
    assert fixed[2] == 0.5


def policy_and_reference(micro_overrides):
    """The micro world, a perturbed policy and an untrained reference (whose velocity is exactly 0)."""
    cfg = load_config(None, micro_overrides)
    world = build_world(cfg)
    return world, perturb_(build_policy(cfg, world)).eval(), build_policy(cfg, world).eval()


def test_implicit_rewards_formula_and_batching(micro_overrides):
    world, policy, reference = policy_and_reference(micro_overrides)
    g = torch.Generator().manual_seed(1)
    first, second = torch.rand(5, 3, 4, 8, 8, generator=g) * 2 - 1, torch.rand(5, 3, 4, 8, 8, generator=g) * 2 - 1
    tokens = world.tokens(world.condition(torch.arange(5)))
    kw = dict(beta=100.0, seed=3, draws=2, t_min=0.3, t_max=1.0)
    a1, a2 = implicit_rewards(policy, reference, first, second, tokens, batch_size=2, **kw)
    b1, b2 = implicit_rewards(policy, reference, first, second, tokens, batch_size=5, **kw)
    torch.testing.assert_close(a1, b1, rtol=1e-5, atol=1e-5)    # float32 sums in another order
    torch.testing.assert_close(a2, b2, rtol=1e-5, atol=1e-5)
    # Against the formula in float64 for pair 3, with the documented streams (seed, "pce", m, i).
    from vidpo.models import flow
    from vidpo.utils.seeding import generator

    total = 0.0
    for m in range(2):
        gm = generator(3, "pce", m, 3)
        t = flow.sample_timesteps(1, gm, t_min=0.3, t_max=1.0)
        eps = torch.randn(first.shape[1:], generator=gm)[None]
        x_t = flow.interpolate(second[3:4], eps, t)
        u = (eps - second[3:4]).double()
        with torch.no_grad():
            err_theta = (policy(x_t, t, tokens[3:4]).double() - u).pow(2).mean()
        err_ref = u.pow(2).mean()
        total += -100.0 * (err_theta - err_ref) / 2
    torch.testing.assert_close(a2[3], total, rtol=1e-5, atol=1e-6)
    same, _ = implicit_rewards(reference, reference, first, second, tokens, **kw)
    assert torch.equal(same, torch.zeros(5, dtype=torch.float64))


def test_video_implicit_rewards_share_draws_by_key(micro_overrides):
    world, policy, reference = policy_and_reference(micro_overrides)
    clip = torch.rand(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    videos, tokens = clip.expand(4, -1, -1, -1, -1), world.tokens(world.condition(torch.zeros(4, dtype=torch.long)))
    kw = dict(beta=100.0, seed=3, draws=2, t_min=0.3, t_max=1.0)
    r = video_implicit_rewards(policy, reference, videos, tokens, torch.tensor([0, 0, 1, 1]), batch_size=3, **kw)
    assert r[0] == r[1] and r[2] == r[3] and r[0] != r[2]     # one video: equal under one key's draws only
    # The pair form is the keyed form with key = pair index for both videos.
    a, b = implicit_rewards(policy, reference, videos[:2], videos[2:], tokens[:2], **kw)
    keyed = video_implicit_rewards(policy, reference, videos, tokens, torch.tensor([0, 1, 0, 1]), **kw)
    torch.testing.assert_close(torch.cat([a, b]), keyed)


def perturbed_base(path, overrides):
    """A perturbed micro DiT saved as an initial policy."""
    return save_perturbed_base(load_config(None, overrides), path)


@pytest.fixture
def base_ckpt(tmp_path, micro_overrides):
    return perturbed_base(tmp_path / "base.safetensors", micro_overrides)


def ipo_cfg(micro_overrides, base, *extra):
    return load_config(None, micro_overrides + [
        f"train.init_from={base}", "train.objective=flow_dpo", "train.max_steps=2", "train.warmup_steps=0",
        "train.ckpt_every=1", "flow.t_min=0.3", "pref.sft_weight=0.5", "iterate.rounds=2", "iterate.seed_pairs=8",
        "iterate.eval_pairs=6", "iterate.votes=3", "iterate.pce_timesteps=1", "critic.width=16", "critic.num_heads=2",
        "critic.depth=1", "critic.steps=4", "critic.batch_size=4", "eval.num_samples=6",
        "iterate.vote_min_confidence=0.55", *extra])


def test_iterate_rounds_summary_report_and_resume_after_kill(tmp_path, micro_overrides, base_ckpt, monkeypatch):
    cfg = ipo_cfg(micro_overrides, base_ckpt)
    out = tmp_path / "run"
    import vidpo.ipo.rounds as rounds

    real_train = rounds.train_preference
    calls = []

    def killed_in_round_2(tcfg, run_dir, **kw):
        calls.append(run_dir)
        if "round_2" in str(run_dir):
            raise KeyboardInterrupt   # the kill arrives in round 2's training
        return real_train(tcfg, run_dir, **kw)

    monkeypatch.setattr(rounds, "train_preference", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        iterate(cfg, out)
    assert (out / "round_1" / "round.json").exists() and not (out / "round_2" / "round.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in [out / "round_1" / "round.json", out / "critic_0" / "critic.safetensors",
                                              out / "round_2" / "critic" / "critic.safetensors"]
            + sorted((out / "round_2" / "pairs" / "shards").iterdir())}
    monkeypatch.setattr(rounds, "train_preference", real_train)
    summary = iterate(cfg, out)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "resuming redid finished work"

    assert json.loads((out / "summary.json").read_text()) == summary
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # The stages computed before the kill still count in the run's total compute.
    timings = summary["timings"]
    assert {"seed_labels_s", "critic_0_s", "base_eval_s", "round_1_s", "round_2_s"} <= set(timings)
    parts = [v for k, v in timings.items() if k not in ("total_s", "this_call_s")]
    assert timings["total_s"] == pytest.approx(sum(parts), abs=0.2) and timings["total_s"] > timings["round_2_s"]
    for row in summary["rounds"]:
        assert set(row) >= {"round", "oracle", "critic_accuracy", "pseudo_labels_kept"}
        lo, hi = row["oracle"]["ci95"]
        assert lo <= row["oracle"]["mean"] <= hi
    r1, r2 = summary["rounds"]
    assert r1["refined"] is False and r1["pseudo_labels_kept"] == 0
    assert r2["refined"] and r2["critic_accuracy_before_refine"] is not None
    # accuracy over every within-prompt pair of the fresh videos too, before and after, with the paired gain
    assert r1["critic_accuracy_pool"] is not None and r1["critic_accuracy_pool_before_refine"] is None
    assert r2["critic_accuracy_pool_before_refine"] is not None and r2["critic_accuracy_pool"] is not None
    # (each fresh pair is one of the pool's; here its 6 prompts are distinct, so the pool adds no other pair)
    assert r2["critic_pool_pairs"] >= r2["critic_eval_pairs"] and "ci95" in r2["critic_accuracy_pool_gain"]
    assert 0 <= r2["pseudo_labels_kept"] <= 8 and r2["pseudo"]["pairs"] == 8
    assert "mean" in summary["base"]["oracle"] and summary["seed_labels"]["pairs"] == 8
    # Every pseudo-label's PCE and kept flag obey the threshold; the training labels came from the critic.
    lines = [json.loads(x) for x in (out / "round_2" / "pairs" / "pseudo.jsonl").read_text().splitlines()]
    assert all(x["kept"] == (x["pce"] > 0.5 and x["video_label"] != 0) for x in lines)
    manifest = [json.loads(x) for x in (out / "round_2" / "pairs" / "manifest.jsonl").read_text().splitlines()]
    assert {m["label_source"] for m in manifest} == {"critic"}
    seed = [json.loads(x) for x in (out / "seed" / "pairs" / "manifest.jsonl").read_text().splitlines()]
    assert {m["label_source"] for m in seed} == {"oracle"}
    html = (out / "report.html").read_text()
    assert "<h2>Rounds</h2>" in html and (out / "report" / "ipo_rounds.png").exists()
    r2_acc = f"{r2['critic_accuracy_before_refine']:.3f} &rarr; {r2['critic_accuracy']:.3f}"
    assert "vs initial policy" in html and r2_acc in html   # the per-round table
    # The ablation without refinement shares round 1 (identical by construction) and redoes round 2 only.
    norefine = ipo_cfg(micro_overrides, base_ckpt, "iterate.refine=false")
    ablation = iterate(norefine, tmp_path / "norefine", reuse=out)
    assert ablation["rounds"][0] == summary["rounds"][0] and not ablation["rounds"][1]["refined"]
    assert (tmp_path / "norefine" / "round_1" / "round.json").samefile(out / "round_1" / "round.json")
    # A critic trained otherwise shares the seed labels, the initial evaluation and round 1's pairs, not critic 0.
    iterate(ipo_cfg(micro_overrides, base_ckpt, "critic.steps=6"), tmp_path / "critic6", reuse=out)
    other = tmp_path / "critic6"
    for item in ("seed/pairs/manifest.jsonl", "base_eval.safetensors", "round_1/pairs/pairs.jsonl"):
        assert (other / item).samefile(out / item), item
    assert not (other / "critic_0" / "critic.json").samefile(out / "critic_0" / "critic.json")
    assert json.loads((other / "critic_0" / "critic.json").read_text())["steps"] == 6
    with pytest.raises(ConfigError, match="nothing can be shared"):
        iterate(ipo_cfg(micro_overrides, base_ckpt, "iterate.refine=false", "seed=5"), tmp_path / "x", reuse=out)
    # Another config in the same directory is refused rather than mixed in.
    with pytest.raises(ConfigError, match="different config.*--overwrite"):
        iterate(ipo_cfg(micro_overrides, base_ckpt, "iterate.votes=5"), out)
    # --overwrite starts that directory over with the new config: nothing of the old run is kept
    (out / "stale.txt").write_text("from the old run")
    iterate(ipo_cfg(micro_overrides, base_ckpt, "iterate.votes=5"), out, overwrite=True)
    assert load_config(out / "config.yaml").iterate.votes == 5 and not (out / "stale.txt").exists()


def test_refinement_over_every_within_prompt_pair(tmp_path, micro_overrides, base_ckpt):
    """iterate.refine_pairs=within_prompt: the critic votes on every pair of two round videos of one prompt, the
    PCE reads one reward per video, and the refined critic trains refine_steps on the seed + kept labels."""
    one_object = micro_overrides + ["world.colours=[red]", "world.shapes=[square]"]   # 4 prompts: the directions
    base = perturbed_base(tmp_path / "base_4prompts.safetensors", one_object)
    cfg = ipo_cfg(one_object, base, "iterate.refine_pairs=within_prompt", "iterate.refine_steps=6",
                  "iterate.vote_min_confidence=0.0")
    summary = iterate(cfg, tmp_path / "pool")
    r2, pairs_dir = summary["rounds"][1], tmp_path / "pool" / "round_2" / "pairs"
    videos, cond = read_pool(pairs_dir)
    first, second = within_prompt_pairs(build_world(cfg), cond)
    assert len(first) == 4 * 6        # 8 pairs over the world's 4 prompts: 4 videos, 6 pairs per prompt
    assert r2["pseudo"]["pairs"] == 24 and r2["pseudo"]["pairing"] == "within_prompt"
    rows = read_pseudo_rows(pairs_dir)
    assert [(x["first_video"], x["second_video"]) for x in rows] == list(zip(first.tolist(), second.tolist()))
    assert all(x["cond_ids"] == cond[x["first_video"]].tolist() == cond[x["second_video"]].tolist() for x in rows)
    assert all(x["kept"] == (x["pce"] > 0.5 and x["video_label"] != 0) for x in rows)
    reward_of = {}
    for x in rows:                     # one implicit reward per video, whichever pairs it is in
        reward_of.setdefault(x["first_video"], set()).add(x["reward_first"])
        reward_of.setdefault(x["second_video"], set()).add(x["reward_second"])
    assert len(reward_of) == 16 and all(len(v) == 1 for v in reward_of.values())
    kept = [x for x in rows if x["kept"]]
    assert 0 < len(kept) == r2["pseudo_labels_kept"]
    quality = r2["pseudo"]["oracle_agreement_all_votes"]
    assert quality is None or 0.0 <= quality <= 1.0
    data = load_pseudo_labels(pairs_dir, 2)
    assert torch.equal(data.first, videos[[x["first_video"] for x in kept]])
    assert torch.equal(data.second, videos[[x["second_video"] for x in kept]])
    torch.testing.assert_close(data.weights, torch.tensor([x["pce"] for x in kept]))
    info = json.loads((pairs_dir.parent / "critic" / "critic.json").read_text())
    assert info["steps"] == 6 and info["pairs"] == summary["seed_labels"]["pairs"] + len(kept)

    # benchmarks/analyses/ipo_critic_fresh_pool.py: the critics before / after round 2's refinement on fresh videos of
    # policy 1 (a stream of their own), against a direct pool_accuracy of each critic
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "analyses"))
    from ipo_critic_fresh_pool import refined_rounds, round_measure, summarize

    run = open_run(tmp_path / "pool")
    assert refined_rounds(run.out) == [2]
    row = round_measure(run, 2, 8)
    fresh, fresh_cond = read_pool(run.out / "round_2" / "pairs_fresh_8")
    assert row["videos"] == 16 and fresh.shape == videos.shape and not torch.equal(fresh, videos)
    with torch.no_grad():
        truth = run.oracle.score(fresh, fresh_cond).total
    for name, directory in (("before", "critic_0"), ("after", "round_2/critic"), ("critic_0", "critic_0")):
        want = pool_accuracy(load_critic(run.out / directory / "critic.safetensors"), fresh, fresh_cond, truth,
                             run.world, run.segment_ids)
        assert row[name] == pytest.approx(want["accuracy"], abs=1e-4) and row["pool_pairs"] == want["n"]
    assert row["gain"][0] == pytest.approx(row["after"] - row["before"], abs=2e-4)
    def stamps():
        return {f: f.stat().st_mtime_ns for f in (run.out / "round_2" / "pairs_fresh_8").rglob("*") if f.is_file()}
    before_second_call = stamps()
    assert round_measure(run, 2, 8)["after"] == row["after"]   # a second call reuses the fresh pairs as they are
    assert stamps() == before_second_call
    total = summarize([{**row, "before": 0.70, "after": 0.72, "critic_0": 0.70},
                       {**row, "seed": 1, "before": 0.70, "after": 0.69, "critic_0": 0.69}])
    assert total["round_2"]["n"] == 2 and total["round_2"]["higher"] == 1
    assert total["round_2"]["gain"][0] == pytest.approx(0.005) and total["round_2"]["after"] == pytest.approx(0.705)
    assert total["round_2"]["gain_vs_critic_0"][0] == pytest.approx(0.01) and total["all"]["n"] == 2
    with pytest.raises(ConfigError, match="refine_steps"):
        iterate(ipo_cfg(micro_overrides, base_ckpt, "iterate.refine_steps=-1"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="vote_keep_fraction"):
        iterate(ipo_cfg(micro_overrides, base_ckpt, "iterate.vote_keep_fraction=1.5"), tmp_path / "bad2")


def test_kto_rounds_with_fixed_base_reference(tmp_path, micro_overrides, base_ckpt):
    over = ["train.objective=kto", "iterate.reference=base", "iterate.refine=false", "generate.num_pairs=16",
            "critic.desirable=0.6", "critic.undesirable=0.4"]
    cfg = ipo_cfg(micro_overrides, base_ckpt, *over)
    summary = iterate(cfg, tmp_path / "kto")
    r1, r2 = summary["rounds"]
    assert summary["objective"] == "kto" and not r2["refined"] and r2["pseudo_labels_kept"] == 0
    labels = r1["labels"]
    assert labels["desirable"] >= 1 and labels["undesirable"] >= 1 and labels["pairs"] >= 1
    assert r2["train"]["reference"] == "frozen_copy(base)" and r1["train"]["reference"] == "frozen_copy"
    # Each KTO record pairs a desirable (first) with an undesirable (second) video of one prompt.
    from vidpo.ipo.critic import load_preference_data
    from vidpo.labeling.critic import score_videos
    from vidpo.models.critic import load_critic
    from vidpo.training.modeling import run_segment_ids

    world, seg = build_world(cfg), run_segment_ids(cfg)
    data = load_preference_data(tmp_path / "kto" / "round_1" / "pairs_kto", 2)
    critic = load_critic(tmp_path / "kto" / "critic_0")
    a = score_videos(critic, data.first, data.cond_ids, world, seg).video
    b = score_videos(critic, data.second, data.cond_ids, world, seg).video
    assert (a > b).all() and (data.video_labels == 1).all()


def test_ranked_pairing_round_pairs_each_prompts_best_and_worst(tmp_path, micro_overrides, base_ckpt):
    cfg = ipo_cfg(micro_overrides, base_ckpt, "iterate.pairing=ranked", "iterate.rank_fraction=0.5",
                  "iterate.rounds=1", "generate.num_pairs=12", "critic.frame_differences=true")
    summary = iterate(cfg, tmp_path / "ranked")
    labels = summary["rounds"][0]["labels"]
    assert labels["videos"] == 24 and labels["pairs"] >= 1 and labels["rank_fraction"] == 0.5
    assert labels["oracle_agreement"] is None or 0.0 <= labels["oracle_agreement"] <= 1.0
    from vidpo.ipo.critic import load_preference_data
    from vidpo.labeling.critic import score_videos
    from vidpo.models.critic import load_critic
    from vidpo.training.modeling import run_segment_ids

    world, seg = build_world(cfg), run_segment_ids(cfg)
    pairs_dir = tmp_path / "ranked" / "round_1" / "pairs_ranked"
    data = load_preference_data(pairs_dir, 2)
    assert len(data) == labels["pairs"] == summary["rounds"][0]["train"]["pairs"]
    critic = load_critic(tmp_path / "ranked" / "critic_0")
    assert critic.frame_differences     # the recipe's critic, rebuilt from its file
    a = score_videos(critic, data.first, data.cond_ids, world, seg)
    b = score_videos(critic, data.second, data.cond_ids, world, seg)
    assert (a.video > b.video).all() and (data.video_labels == 1).all()
    # Segment labels are the signs of the critic's segment score differences (what DenseDPO would read).
    assert torch.equal(data.labels, torch.sign(a.segments - b.segments).long())
    manifest = [json.loads(x) for x in (pairs_dir / "manifest.jsonl").read_text().splitlines()]
    assert {m["label_source"] for m in manifest} == {"critic-ranked"}
    # Every generated video is in the scored pool: the pairs hold only videos of the round's pairs.
    gen = load_preference_data(tmp_path / "ranked" / "round_1" / "pairs", 2, records=_unlabelled(
        tmp_path / "ranked" / "round_1" / "pairs"))
    pool = torch.cat([gen.first, gen.second]).flatten(1)
    for video in torch.cat([data.first, data.second]).flatten(1):
        assert (pool == video).all(1).any()
    # The ceiling ablation ranks a pool by the oracle: every pair then agrees with the oracle. With another
    # number of pairs per round it shares the seed labels and critic 0 of the run above, not round 1's pairs.
    # margin_fraction keeps the widest half of the ranked pairs.
    ceiling = iterate(ipo_cfg(micro_overrides, base_ckpt, "iterate.pairing=ranked", "iterate.rank_fraction=0.5",
                              "iterate.rounds=1", "generate.num_pairs=10", "iterate.round_labeler=oracle",
                              "iterate.margin_fraction=0.5", "critic.frame_differences=true"),
                      tmp_path / "oracle", reuse=tmp_path / "ranked")
    ceiling_labels = ceiling["rounds"][0]["labels"]
    assert ceiling_labels["oracle_agreement"] == 1.0 and ceiling_labels["videos"] == 20
    assert ceiling_labels["pairs"] == math.ceil(0.5 * ceiling_labels["ranked_pairs"]) >= 1
    assert (tmp_path / "oracle" / "critic_0" / "critic.safetensors").samefile(
        tmp_path / "ranked" / "critic_0" / "critic.safetensors")
    assert not (tmp_path / "oracle" / "round_1" / "pairs" / "pairs.jsonl").samefile(
        tmp_path / "ranked" / "round_1" / "pairs" / "pairs.jsonl")
    manifest = [json.loads(x) for x in (tmp_path / "oracle" / "round_1" / "pairs_ranked" / "manifest.jsonl")
                .read_text().splitlines()]
    assert {m["label_source"] for m in manifest} == {"oracle-ranked"}


def _unlabelled(pairs_dir):
    from vidpo.data.pairs import PAIRS_FILE, read_manifest

    records, _ = read_manifest(pairs_dir / PAIRS_FILE, need_labels=False)
    for r in records:   # load_preference_data needs labels; the pool check reads the videos only
        r.labels, r.video_label = [0, 0], 0
    return records


def test_iterate_rejects_configs_it_cannot_run(tmp_path, micro_overrides, base_ckpt):
    with pytest.raises(ConfigError, match="train.objective"):
        iterate(ipo_cfg(micro_overrides, base_ckpt, "train.objective=sft"), tmp_path / "a")
    with pytest.raises(ConfigError, match="lora"):
        iterate(ipo_cfg(micro_overrides, base_ckpt, "lora.rank=2"), tmp_path / "b")


def _fake_run(seed_offset, r1, r2, base=0.30):
    def row(k, mean, acc_before=None):
        refined = acc_before is not None
        return {"round": k, "oracle": {"mean": mean, "ci95": [mean - 0.01, mean + 0.01]},
                "delta_vs_base": {"mean": mean - base, "ci95": [mean - base - 0.01, mean - base + 0.01]},
                "critic_accuracy": 0.8, "critic_accuracy_before_refine": acc_before, "pseudo_labels_kept": 10 * k,
                "critic_accuracy_pool": 0.75, "critic_accuracy_pool_before_refine": 0.76 if refined else None,
                "critic_accuracy_pool_gain": {"mean": -0.01 + seed_offset, "ci95": [-0.03, 0.01]} if refined else None,
                "labels": {"oracle_agreement": 0.9 + seed_offset}}
    return {"rounds": [row(1, r1), row(2, r2, 0.7)], "base": {"oracle": {"mean": base, "ci95": [base, base]}},
            "timings": {"total_s": 120.0}}


def test_seed_aggregation_and_rounds_table(tmp_path):
    from vidpo.ipo.sweep import aggregate_runs
    from vidpo.ipo.report import rounds_table

    runs = [_fake_run(0.00, 0.31, 0.33), _fake_run(0.02, 0.32, 0.35), _fake_run(0.04, 0.30, 0.34)]
    agg = aggregate_runs(runs)
    r1, r2 = agg["rounds"]
    assert r1["oracle"]["mean"] == pytest.approx(0.31) and r1["delta_vs_round_1"] is None
    # round 2 - round 1 per seed: 0.02, 0.03, 0.04 -> mean 0.03, Student-t CI with 2 degrees of freedom
    half = 4.302652729911275 * 0.01 / 3 ** 0.5
    assert r2["delta_vs_round_1"]["mean"] == pytest.approx(0.03)
    assert r2["delta_vs_round_1"]["ci95"] == pytest.approx([0.03 - half, 0.03 + half], abs=1e-5)   # 6 decimals
    assert r2["label_agreement"] == pytest.approx(0.92) and r2["critic_accuracy_before_refine"] == pytest.approx(0.7)
    assert r2["pseudo_labels_kept"] == 20 and agg["minutes_per_run"] == 2.0
    # refinement's pool gain: per seed -0.01, +0.01, +0.03 -> mean +0.01 with a t-CI over the 3 seeds
    assert r1["critic_accuracy_pool_gain"] is None and r2["critic_accuracy_pool_gain"]["mean"] == pytest.approx(0.01)
    html = rounds_table({"dpo": agg["rounds"]}, agg["base"]["oracle"])
    assert "vs round 1" in html and "+0.0300 [" in html and "0.700 &rarr; 0.800" in html
    assert "0.760 &rarr; 0.750 (+0.0100 [" in html   # the pool column, with the gain over seeds
    from vidpo.ipo.report import plot_rounds

    assert plot_rounds({"dpo": agg["rounds"]}, tmp_path / "rounds.png", agg["base"]["oracle"]).stat().st_size > 0


def test_comparison_runs_in_processes_and_reports_a_failed_run(tmp_path, micro_overrides, base_ckpt):
    """`vidpo iterate A B --seeds 0 1 --jobs 2`: every run is its own process, B's runs start after A's run of the
    same seed and reuse its round 1, and the aggregate reads the finished runs back. A run that fails names
    its log."""
    from vidpo.ipo.sweep import compare_iterations

    (tmp_path / "a.yaml").write_text("seed: 0\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\niterate:\n  refine: false\n")
    over = micro_overrides + [
        f"train.init_from={base_ckpt}", "train.objective=flow_dpo", "train.max_steps=2", "train.warmup_steps=0",
        "train.num_threads=1", "flow.t_min=0.3", "pref.sft_weight=0.5", "iterate.rounds=2", "iterate.seed_pairs=8",
        "iterate.eval_pairs=6", "iterate.votes=3", "iterate.pce_timesteps=1", "critic.width=16",
        "critic.num_heads=2", "critic.depth=1", "critic.steps=4", "critic.batch_size=4", "eval.num_samples=6"]
    out = tmp_path / "cmp"
    recipes = [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    summary = compare_iterations(recipes, [0, 1], out, over, jobs=2, gpus="7,9")
    assert summary["seeds"] == [0, 1] and set(summary["methods"]) == {"a", "b"}
    # --gpus: the two runs that start together get one device each (on CPU the id only reaches the log)
    first_runs = {(out / "a" / f"seed{k}" / "vidpo.log").read_text().split("CUDA_VISIBLE_DEVICES=")[1][0]
                  for k in (0, 1)}
    assert first_runs == {"7", "9"}
    for name in ("a", "b"):
        for seed in (0, 1):
            assert (out / name / f"seed{seed}.log").exists()
            assert load_config(out / name / f"seed{seed}" / "config.yaml").seed == seed
            assert (out / name / f"seed{seed}" / "round_2" / "round.json").exists()
        # B differs from A only from round 2 on: its round 1 is A's, linked (the process honoured the reuse).
        assert (out / "b" / "seed1" / "round_1" / "round.json").samefile(out / "a" / "seed1" / "round_1" / "round.json")
    rounds = summary["methods"]["a"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and len(rounds[0]["per_seed_oracle"]) == 2
    assert (out / "summary.json").exists() and (out / "report.html").exists()

    broken = [o for o in over if not o.startswith("train.init_from=")] + [f"train.init_from={tmp_path / 'missing'}"]
    with pytest.raises(RuntimeError, match=r"a seed 0 \(exit [12], .*seed0\.log\)"):
        compare_iterations([recipes[0]], [0], tmp_path / "broken", broken, jobs=2)


def test_jobs_spread_runs_over_the_least_busy_gpu(monkeypatch):
    from vidpo.ipo.sweep import gpu_list, least_busy

    assert least_busy([], ["0"]) is None
    assert least_busy(["0", "1"], []) == "0" and least_busy(["0", "1"], ["0"]) == "1"
    assert least_busy(["0", "1"], ["0", "1", "1"]) == "0"          # more runs than devices: shared evenly
    assert gpu_list("2, 3") == ["2", "3"] and gpu_list("none") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert gpu_list(None) == ["4", "5"]
    with pytest.raises(ConfigError, match="--gpus"):
        gpu_list(",")


def test_rounds_figure_drops_the_pseudo_label_panel_without_refinement(tmp_path):
    from PIL import Image

    from vidpo.ipo.report import plot_rounds

    rows = [{"round": r, "oracle": {"mean": 0.3 + 0.01 * r, "ci95": [0.29, 0.33]}, "critic_accuracy": 0.8,
             "pseudo_labels_kept": 0} for r in (1, 2)]
    plain = plot_rounds({"ipo": rows}, tmp_path / "plain.png")
    refined = plot_rounds({"ipo": rows, "dual": [dict(r, pseudo_labels_kept=50) for r in rows]}, tmp_path / "dual.png")
    assert Image.open(plain).size[0] == 9 * 110 and Image.open(refined).size[0] == 13 * 110   # 2 vs 3 panels
