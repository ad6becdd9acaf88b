"""The IPO critic: Bradley-Terry-with-ties loss (float64 reference), the network, the world's symmetries,
pointwise labels, training that learns a real preference, the 'critic' labeller and `vidpo critic`."""
import json
import math

import pytest
import torch

from vidpo.utils import atomic
from vidpo.cli import main as cli_main
from vidpo.labeling.critic import (CriticLabeler, Symmetries, build_critic, cond_ids_from_captions,
                                   labels_from_differences, tie_margin_of, score_videos)
from vidpo.ipo.critic import (bt_ties_log_probs, bt_ties_nll, critic_accuracy, critic_loss, load_preference_data,
                              pointwise_labels, pool_accuracy, pool_gain, train_critic, within_prompt_pairs)
from vidpo.ipo.pairing import ranked_pairs, widest_pairs
from vidpo.data.oracle import ShapesOracle
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, PairRecord, shard_name, write_manifest
from vidpo.labeling import PairBatch, build_labeler
from vidpo.models.critic import CriticScores, load_critic, save_critic, segment_means
from vidpo.training.modeling import build_world
from vidpo.config import load_config
from vidpo.data.segments import segment_ids


# Two intra-op threads on two busy cores make these tiny models ~50x slower (OpenMP oversubscription).
pytestmark = pytest.mark.usefixtures("one_thread")


def davidson_reference(d, nu):
    """P(first better), P(second better), P(tie) from strengths pi = exp(s) (Davidson 1970), float64."""
    pi_a, pi_b = torch.exp(d.double()), torch.ones_like(d, dtype=torch.float64)
    z = pi_a + pi_b + nu * torch.sqrt(pi_a * pi_b)
    return pi_a / z, pi_b / z, nu * torch.sqrt(pi_a * pi_b) / z


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_bt_ties_matches_davidson_float64(shape):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    for log_nu in (-3.0, 0.0, 1.3):
        logp = bt_ties_log_probs(d, torch.tensor(log_nu, dtype=torch.float64))
        win, lose, tie = davidson_reference(d, math.exp(log_nu))
        torch.testing.assert_close(logp.exp(), torch.stack([lose, tie, win], -1), rtol=1e-12, atol=1e-12)
        labels = torch.randint(-1, 2, shape, generator=g)
        expected = -torch.log(torch.where(labels > 0, win, torch.where(labels < 0, lose, tie)))
        torch.testing.assert_close(bt_ties_nll(d, labels, torch.tensor(log_nu, dtype=torch.float64)), expected)
    # nu -> 0 is plain Bradley-Terry; the loss is differentiable in d and log nu.
    plain = bt_ties_log_probs(d, torch.tensor(-60.0, dtype=torch.float64))[..., 2]
    torch.testing.assert_close(plain, torch.nn.functional.logsigmoid(d), rtol=1e-10, atol=1e-10)
    log_nu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    dd = d.clone().requires_grad_(True)
    labels = torch.randint(-1, 2, shape, generator=g)
    assert torch.autograd.gradcheck(lambda a, b: bt_ties_nll(a, labels, b).sum(), (dd, log_nu))


def test_critic_loss_weights_ties_and_segments():
    g = torch.Generator().manual_seed(1)
    frames_a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    frames_b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    seg = torch.tensor([0, 0, 1, 1])
    a = CriticScores(frames_a, segment_means(frames_a, seg), frames_a.mean(1))
    b = CriticScores(frames_b, segment_means(frames_b, seg), frames_b.mean(1))
    labels = torch.tensor([[1, 1], [-1, 0], [0, 0], [1, -1], [-1, -1]])
    video = torch.tensor([1, -1, 0, 0, -1])
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0, 0.7], dtype=torch.float64)
    log_nu = torch.tensor(-0.5, dtype=torch.float64)
    loss, metrics = critic_loss(a, b, labels, video, log_nu, weights, segment_weight=0.5)
    per_pair = [bt_ties_nll(a.video[i] - b.video[i], video[i], log_nu)
                + 0.5 * bt_ties_nll(a.segments[i] - b.segments[i], labels[i], log_nu).mean() for i in range(5)]
    expected = sum(w * p for w, p in zip(weights, per_pair)) / weights.sum()
    torch.testing.assert_close(loss, expected)
    assert metrics["nu"] == pytest.approx(math.exp(-0.5))
    # A pair with weight 0 gets no gradient.
    fa = frames_a.clone().requires_grad_(True)
    a = CriticScores(fa, segment_means(fa, seg), fa.mean(1))
    critic_loss(a, b, labels, video, log_nu, weights, segment_weight=0.5)[0].backward()
    assert fa.grad[3].abs().max() == 0 and fa.grad[0].abs().max() > 0
    assert labels_from_differences(torch.tensor([0.3, -0.3, 0.1, -2.0]), 0.2).tolist() == [1, -1, 0, -1]


def test_confidence_margin_is_where_the_winner_probability_reaches_it(micro_overrides):
    cfg = load_config(None, micro_overrides + ["critic.width=16", "critic.num_heads=2", "critic.depth=1"])
    critic = build_critic(cfg, build_world(cfg))
    for log_nu in (-2.0, 0.4):
        with torch.no_grad():
            critic.log_tie.fill_(log_nu)
        assert tie_margin_of(critic, None) == pytest.approx(2 * max(log_nu, 0.0))
        for p in (0.6, 0.85, 0.97):
            d = tie_margin_of(critic, None, p)
            stored = critic.log_tie.detach().double()     # the float32 parameter, exactly
            win = bt_ties_log_probs(torch.tensor(d, dtype=torch.float64), stored)[2]
            assert float(win.exp()) == pytest.approx(p, abs=1e-9)
        assert tie_margin_of(critic, 9.0, 0.6) == 9.0          # an explicit larger margin wins
    with pytest.raises(ValueError, match="min_confidence"):
        tie_margin_of(critic, None, 1.0)


@pytest.mark.parametrize("frame_differences", [False, True])
def test_critic_network_shapes_segments_and_file_roundtrip(tmp_path, micro_overrides, frame_differences):
    cfg = load_config(None, micro_overrides + ["critic.width=16", "critic.num_heads=2", "critic.depth=1",
                                               "critic.patch_size=[2,4,4]",
                                               f"critic.frame_differences={frame_differences}"])
    world = build_world(cfg)
    critic = build_critic(cfg, world).eval()
    x = torch.rand(3, 3, 4, 8, 8) * 2 - 1
    tokens = world.tokens(world.condition(torch.tensor([0, 5, 9])))
    seg = torch.tensor([0, 0, 1, 1])
    out = critic(x, tokens, seg)
    assert out.frames.shape == (3, 4) and out.segments.shape == (3, 2) and out.video.shape == (3,)
    assert torch.equal(out.frames[:, 0], out.frames[:, 1])        # pt = 2: one score per latent frame
    torch.testing.assert_close(out.segments, torch.stack([out.frames[:, :2].mean(1), out.frames[:, 2:].mean(1)], 1))
    torch.testing.assert_close(out.video, out.frames.mean(1))
    save_critic(critic, tmp_path / "c" / "critic.safetensors")
    again = load_critic(tmp_path / "c")
    assert again.frame_differences == frame_differences
    torch.testing.assert_close(again(x, tokens, seg).video, out.video)
    if frame_differences:
        # The patch vector is (2C, pt, ph, pw): the clip's C channels, then its C difference channels. Cutting
        # the second half of the embedding changes nothing for a static clip (its differences are zero) and
        # changes the scores of a moving one.
        assert critic.patch_embed.weight.shape[1] == 2 * 3 * 2 * 4 * 4
        blind = load_critic(tmp_path / "c")
        with torch.no_grad():
            blind.patch_embed.weight[:, 3 * 2 * 4 * 4:] = 0
        static = x[:, :, :1].expand_as(x).contiguous()
        torch.testing.assert_close(blind(static, tokens, seg).video, critic(static, tokens, seg).video)
        assert not torch.allclose(blind(x, tokens, seg).video, out.video)
    with pytest.raises(FileNotFoundError, match="vidpo critic train"):
        load_critic(tmp_path / "missing")


def test_symmetries_preserve_the_oracle_judgement():
    cfg = load_config(None, ["world.wrong_colour=0.3", "world.reversed_direction=0.3", "world.local_artifact=0.2"])
    world, oracle = build_world(cfg), None
    oracle = ShapesOracle(world)
    seg = segment_ids(8, 8.0, 0.5)
    sym = Symmetries(world, seg)
    assert len(sym) == 8 and sym.items[0].name == "identity"
    cond = world.condition(torch.arange(32))
    clips = world.render(cond, torch.Generator().manual_seed(3), corrupt=True).clips
    ref = oracle.score(clips, cond, seg)
    for k in range(1, len(sym)):
        moved = oracle.score(sym.clips(k, clips), sym.cond_ids(k, cond), seg)
        torch.testing.assert_close(moved.total, ref.total, atol=2e-3, rtol=0)
        torch.testing.assert_close(sym.segments(k, moved.segments), ref.segments, atol=5e-3, rtol=0)
    # A vocabulary without 'left' has no horizontal flip; segments of unequal length have no time reversal.
    small = build_world(load_config(None, ["world.directions=[right,up,down]"]))
    names = [s.name for s in Symmetries(small, torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])).items]
    assert names == ["identity", "vflip"]


def test_pool_accuracy_counts_every_within_prompt_pair(micro_overrides):
    """pool_accuracy against a direct loop over all pairs of videos with the same prompt (truth ties skipped)."""
    cfg = load_config(None, micro_overrides + ["critic.width=16", "critic.num_heads=2", "critic.depth=1"])
    world = build_world(cfg)
    critic = build_critic(cfg, world).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.tensor([0, 5, 0, 5, 0, 9, 5])   # 3 + 3 + 0 within-prompt pairs (prompt 9 is alone)
    cond = world.condition(prompts)
    videos = torch.rand(len(prompts), 3, 4, 8, 8, generator=g) * 2 - 1
    truth = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.1, 0.9, 0.7])   # videos 0 and 4 tie
    seg = torch.tensor([0, 0, 1, 1])
    first, second = within_prompt_pairs(world, cond)
    assert sorted(zip(first.tolist(), second.tolist())) == [(0, 2), (0, 4), (1, 3), (1, 6), (2, 4), (3, 6)]
    scores = score_videos(critic, videos, cond, world, seg).video
    want = [float(torch.sign(scores[i] - scores[j]) == torch.sign(truth[i] - truth[j]))
            for i, j in zip(first.tolist(), second.tolist()) if truth[i] != truth[j]]
    got = pool_accuracy(critic, videos, cond, truth, world, seg)
    assert got["n"] == 5 and got["correct"].tolist() == want
    assert got["accuracy"] == pytest.approx(sum(want) / 5)
    index = world.condition_index(cond)
    assert got["prompt"].tolist() == [int(index[i]) for i, j in zip(first.tolist(), second.tolist())
                                      if truth[i] != truth[j]]

    # pool_gain: a t-interval over the prompts' mean paired differences (pairs sharing videos are one cluster)
    other = build_critic(cfg, world).eval()
    got_other = pool_accuracy(other, videos, cond, truth, world, seg)
    diff = got_other["correct"] - got["correct"]
    per_prompt = torch.stack([diff[got["prompt"] == p].mean() for p in got["prompt"].unique()]).double()
    gain = pool_gain(got_other, got)
    assert gain["n"] == 2 and gain["mean"] == pytest.approx(float(per_prompt.mean()))
    half = 12.706 * float(per_prompt.std()) / 2 ** 0.5   # t(0.975, 1 degree of freedom)
    assert gain["ci95"] == pytest.approx([gain["mean"] - half, gain["mean"] + half], abs=1e-3)
    with pytest.raises(ValueError, match="same videos"):
        pool_gain(got_other, {**got, "prompt": got["prompt"].flip(0)})


def test_pointwise_labels_quantiles_and_thresholds():
    scores = torch.arange(10, dtype=torch.float32)
    q = pointwise_labels(scores, "quantile", 0.7, 0.3)
    assert q.tolist() == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1]
    t = pointwise_labels(scores, "threshold", 6.5, 1.0)
    assert t.tolist() == [-1, -1, 0, 0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="undesirable < desirable"):
        pointwise_labels(scores, "quantile", 0.3, 0.7)


def test_ranked_pairs_pair_each_prompts_best_with_its_worst():
    #                       prompt 0 (5 videos)        prompt 1 (2)  prompt 2 (1)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 2.0, -1.0, 5.0])
    prompts = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    first, second = ranked_pairs(scores, prompts, 0.4)
    # prompt 0: k = round(0.4 * 5) = 2 -> top {1, 4} x bottom {3, 0}; prompt 1: k = 1; prompt 2 has no pair.
    assert list(zip(first, second)) == [(1, 3), (1, 0), (4, 3), (4, 0), (5, 6)]
    assert all(prompts[i] == prompts[j] and scores[i] > scores[j] for i, j in zip(first, second))
    # k never exceeds half a prompt's videos, so no video is on both sides; k >= 1 for any fraction.
    first, second = ranked_pairs(scores, prompts, 0.5)
    assert not set(first) & set(second) and len(first) == 2 * 2 + 1
    assert len(ranked_pairs(scores, prompts, 0.01)[0]) == 2
    with pytest.raises(ValueError, match="rank_fraction"):
        ranked_pairs(scores, prompts, 0.6)


def test_widest_pairs_keep_the_largest_score_gaps_across_prompts():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 2.0, -1.0, 5.0])
    first, second = [1, 1, 4, 4, 5], [3, 0, 3, 0, 6]          # gaps 0.6, 0.8, 0.4, 0.6, 3.0
    assert widest_pairs(scores, first, second, 1.0) == (first, second)
    # ceil(0.4 * 5) = 2 widest, in their original order: (1, 0) gap 0.8 and (5, 6) gap 3.0.
    assert widest_pairs(scores, first, second, 0.4) == ([1, 5], [0, 6])
    # Equal gaps (0.6 of pairs 0 and 3) keep the earlier pair; at least one pair always survives.
    assert widest_pairs(scores, first, second, 0.6) == ([1, 1, 5], [3, 0, 6])
    assert widest_pairs(scores, first, second, 0.01) == ([5], [6])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="margin_fraction"):
            widest_pairs(scores, first, second, bad)
    with pytest.raises(ValueError, match="2 preferred and 1 rejected"):
        widest_pairs(scores, [1, 2], [3], 0.5)


def _colour_pairs(world, n, seed):
    """Pairs of one prompt: the clip as captioned vs the same clip in another colour (randomly ordered)."""
    g = torch.Generator().manual_seed(seed)
    cond = world.condition(torch.randint(world.num_conditions, (n,), generator=g))
    good = world.render(cond, torch.Generator().manual_seed(seed + 1)).clips
    wrong = cond.clone()
    wrong[:, 0] = (cond[:, 0] + 1 + torch.randint(len(world.colours) - 1, (n,), generator=g)) % len(world.colours)
    bad = world.render(wrong, torch.Generator().manual_seed(seed + 1)).clips
    flip = torch.rand(n, generator=g) < 0.5
    first = torch.where(flip[:, None, None, None, None], bad, good)
    second = torch.where(flip[:, None, None, None, None], good, bad)
    y = torch.where(flip, -1, 1)
    return first, second, cond, y


def _write_pairs(directory, first, second, cond, y, world, segments):
    atomic.save_safetensors({"first": first, "second": second, "cond_ids": cond}, directory / shard_name(0))
    caps = world.captions(cond)
    records = [PairRecord(pair_id=f"p{i:04d}", shard=shard_name(0), row=i, cond_ids=cond[i].tolist(), caption=caps[i],
                          labels=[int(y[i])] * segments, video_label=int(y[i])) for i in range(len(y))]
    write_manifest(directory / MANIFEST_FILE, records)
    write_manifest(directory / PAIRS_FILE, records)


def test_critic_learns_a_real_preference_and_labels_with_it(tmp_path, micro_overrides):
    over = micro_overrides + ["critic.width=32", "critic.num_heads=2", "critic.depth=1", "critic.steps=80",
                              "critic.lr=3e-3", "critic.batch_size=32", "critic.warmup_steps=5"]
    cfg = load_config(None, over)
    world = build_world(cfg)
    seg = torch.tensor([0, 0, 1, 1])
    _write_pairs(tmp_path, *_colour_pairs(world, 160, 0), world, 2)
    data = load_preference_data(tmp_path, 2)
    assert len(data) == 160 and data.weights.eq(1).all()
    train, test = data.subset(range(120)), data.subset(range(120, 160))
    critic, info = train_critic(cfg, train, world, seg, device=torch.device("cpu"))
    acc = critic_accuracy(critic, test, world, seg)
    assert acc["n"] == 40 and acc["accuracy"] >= 0.85, acc
    untrained = critic_accuracy(build_critic(cfg, world), test, world, seg)["accuracy"]
    assert acc["accuracy"] > untrained
    # A rerun with the same seed trains the same critic.
    again, _ = train_critic(cfg, train, world, seg, device=torch.device("cpu"))
    torch.testing.assert_close(score_videos(again, test.first, test.cond_ids, world, seg).video,
                               score_videos(critic, test.first, test.cond_ids, world, seg).video)
    # A warm start trains a copy of the given critic: at a zero learning rate it scores exactly as that critic,
    # and the critic it started from is left untouched.
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    frozen = load_config(None, over + ["critic.lr=0", "critic.steps=3"])
    warm, _ = train_critic(frozen, train, world, seg, device=torch.device("cpu"), init=critic)
    assert warm is not critic and all(torch.equal(before[k], v) for k, v in critic.state_dict().items())
    torch.testing.assert_close(score_videos(warm, test.first, test.cond_ids, world, seg).video,
                               score_videos(critic, test.first, test.cond_ids, world, seg).video)

    labeler = build_labeler("critic", critic=critic, world=world, tie_margin=0.0)
    assert isinstance(labeler, CriticLabeler)
    captions = world.captions(test.cond_ids)
    batch = PairBatch(first=test.first, second=test.second, captions=captions, pair_ids=test.pair_ids, segment_ids=seg)
    result = labeler.label(batch)                       # no cond_ids: parsed back from the captions
    d = score_videos(critic, test.first, test.cond_ids, world, seg).video - \
        score_videos(critic, test.second, test.cond_ids, world, seg).video
    assert torch.equal(result.video_labels, torch.sign(d).long()) and result.labels.shape == (40, 2)
    assert torch.equal(cond_ids_from_captions(world, captions), test.cond_ids)
    points = labeler.label_pointwise(test.first, captions, seg)
    assert points.shape == (40, 2) and torch.equal(points[:, 0], points[:, 1])
    with pytest.raises(Exception, match="cannot read the condition"):
        cond_ids_from_captions(world, ["a mauve blob"])


def test_critic_cli_train_and_eval(tmp_path, micro_overrides, capsys):
    cfg = load_config(None, micro_overrides)
    world = build_world(cfg)
    (tmp_path / "pairs").mkdir()
    _write_pairs(tmp_path / "pairs", *_colour_pairs(world, 40, 5), world, 2)
    sets = []
    for s in micro_overrides + ["critic.width=16", "critic.num_heads=2", "critic.depth=1", "critic.steps=10"]:
        sets += ["--set", s]
    assert cli_main(["critic", "train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "c")] + sets
                    + ["recipes/shapes/pretrain.yaml"]) == 0
    info = json.loads((tmp_path / "c" / "critic.json").read_text())
    assert info["pairs"] == 32 and info["heldout"]["n"] == 8 and 0 <= info["heldout"]["accuracy"] <= 1
    capsys.readouterr()
    assert cli_main(["critic", "eval", "recipes/shapes/pretrain.yaml", "--critic", str(tmp_path / "c"),
                     "--pairs", str(tmp_path / "pairs")] + sets) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[str(tmp_path / "pairs")]["n"] == 40
    # The 'critic' labeller of a recipe without a checkpoint says what to set.
    assert cli_main(["label", "recipes/shapes/pretrain.yaml", "--pairs", str(tmp_path / "pairs"),
                     "--set", "label.labeler=critic"] + sets) == 2
    assert "critic.checkpoint" in capsys.readouterr().err
