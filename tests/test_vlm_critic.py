"""The VLM critic (vidpo.models.critic.vlm) on a tiny random LLaVA built here (tests/helpers/llava_serve.py): the
scoring interface (per-frame / segment / video scores, captions read, uint8 = float pixels), what trains, Monte-Carlo
dropout, its file (head + LoRA + settings, atomic, no backbone weights) and reload, the 'critic' labeller and KTO
scores from a checkpoint, and training with the Bradley-Terry-with-ties loss on a planted preference: in pairs of
synthetic clips one segment of one video flickers, and that segment loses."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from helpers.llava_serve import build_tiny_llava  # noqa: E402
from vidpo.config import ConfigError, load_config  # noqa: E402
from vidpo.data.segments import segment_ids  # noqa: E402
from vidpo.evaluation.evaluate import mean_ci  # noqa: E402
from vidpo.ipo.critic import PreferenceData, critic_accuracy, train_critic  # noqa: E402
from vidpo.labeling import PairBatch, build_labeler  # noqa: E402
from vidpo.labeling.critic import build_scorer, open_critic, score_clips, tie_margin_of  # noqa: E402
from vidpo.models.critic import VLMCritic, critic_format, load_critic, save_critic  # noqa: E402
from vidpo.models.critic.vlm import segment_frame_picks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES, SIZE, FPS = 9, 32, 8.0
SEG = segment_ids(FRAMES, FPS, 0.5)             # 9 frames at 8 fps, 0.5 s segments: frames 0-3 and 4-8
CAPTIONS = ("a red square moving left", "a blue circle moving up", "a green ball moving right")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


def vlm_cfg(backbone, *extra):
    return load_config(None, [f"critic.backbone={backbone}", "critic.lora_rank=4", "critic.lora_alpha=8",
                              "critic.frames_per_segment=2", *extra])


def fresh_critic(backbone, *extra, seed=0) -> VLMCritic:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_scorer(vlm_cfg(backbone, *extra)).eval()


def clips(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 3, F, S, S) in [-1, 1]: a background of random brightness with a gentle ramp, and a bright square
    drifting right by one pixel a frame."""
    ramp = torch.linspace(-1, 1, SIZE)
    video = (torch.rand(n, 3, 1, 1, 1, generator=g) - 0.5) + 0.3 * ramp * torch.rand(n, 1, 1, 1, 1, generator=g)
    video = video.expand(n, 3, FRAMES, SIZE, SIZE).clone()
    start = torch.randint(4, 16, (n,), generator=g)
    for i in range(n):
        for t in range(FRAMES):
            x = int(start[i]) + t
            video[i, :, t, 12:20, x:x + 8] = 0.8
    return video.clamp(-1, 1)


def flicker_pairs(n: int, seed: int, amplitude: float = 0.7):
    """Pairs of clips where one segment of one video flickers: each of its frames brightened or darkened by
    ``amplitude`` at random. Labels: that segment loses (the other video wins it), the other segment ties; the
    whole-video label is their majority (the clean video)."""
    g = torch.Generator().manual_seed(seed)
    first, second = clips(n, g), clips(n, g)
    labels = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        segment, loser = int(torch.randint(2, (1,), generator=g)), int(torch.randint(2, (1,), generator=g))
        frames = torch.nonzero(SEG == segment).flatten()
        sign = torch.where(torch.rand(len(frames), generator=g) < 0.5, -1.0, 1.0)
        target = first if loser == 0 else second
        target[i, :, frames] = (target[i, :, frames] + amplitude * sign[None, :, None, None]).clamp(-1, 1)
        labels[i, segment] = -1 if loser == 0 else 1
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return PreferenceData(first=first, second=second, cond_ids=torch.zeros(n, 0, dtype=torch.long), labels=labels,
                          video_labels=torch.sign(labels.sum(1)), weights=torch.ones(n),
                          pair_ids=[f"p{seed}-{i}" for i in range(n)], captions=caps)


def test_segment_frame_picks_spread_over_each_segment():
    assert segment_frame_picks(SEG, 2).tolist() == [[0, 3], [4, 8]]
    assert segment_frame_picks(SEG, 3).tolist() == [[0, 2, 3], [4, 6, 8]]
    assert segment_frame_picks(torch.tensor([0, 1, 1]), 2).tolist() == [[0, 0], [1, 2]]   # a 1-frame segment repeats
    assert segment_frame_picks(SEG, 1).tolist() == [[2], [6]]


def test_vlm_critic_scores_through_the_interface_and_reloads(backbone, tmp_path):
    critic = fresh_critic(backbone)
    with torch.no_grad():   # a head with nonzero LoRA factors, so the file must carry them
        for name, p in critic.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(1)
    x = clips(4, g)
    caps = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[2]]
    with torch.no_grad():
        out = critic.score(x, caps, SEG)
    assert out.frames.shape == (4, FRAMES) and out.segments.shape == (4, 2) and out.video.shape == (4,)
    # every frame carries its segment's score; the video score is the frame mean (frame-count-weighted segments)
    torch.testing.assert_close(out.frames, out.segments[:, SEG])
    torch.testing.assert_close(out.video, (4 * out.segments[:, 0] + 5 * out.segments[:, 1]) / 9)
    with torch.no_grad():
        other = critic.score(x, [CAPTIONS[2]] * 4, SEG)
        as_uint8 = critic.score(((x + 1) * 127.5).round().to(torch.uint8), caps, SEG)
        alone = critic.score(x[1:2], caps[1:2], SEG)
    assert not torch.allclose(other.segments, out.segments)            # the caption is read
    torch.testing.assert_close(as_uint8.segments, out.segments)          # uint8 frames = the same pixels
    torch.testing.assert_close(alone.segments, out.segments[1:2], rtol=1e-4, atol=1e-5)   # padding does not leak
    # the text the backbone reads: the chat template over 2 images per segment and the instruction with the caption
    text = critic.prompt_text(CAPTIONS[1])
    assert text.count("<image>") == 2 and CAPTIONS[1] in text and text.endswith("assistant:")

    # what trains: the head, the tie parameter and the LoRA factors; the backbone is frozen
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert "log_tie" in trainable and {"head.1.weight", "head.1.bias"} <= trainable
    assert all(n in ("log_tie", "head.1.weight", "head.1.bias") or ".lora_" in n for n in trainable)
    assert any("language_model" in n for n in trainable) and len(critic.adapted) >= 4

    # Monte-Carlo dropout: a seeded draw differs from the plain score and repeats with its seed
    plain = score_clips(critic, x, caps, SEG)
    draw = score_clips(critic, x, caps, SEG, dropout_seed=3)
    assert not torch.allclose(draw.video, plain.video)
    torch.testing.assert_close(score_clips(critic, x, caps, SEG, dropout_seed=3).video, draw.video)
    torch.testing.assert_close(score_clips(critic, x, caps, SEG, batch_size=3).video, plain.video, rtol=1e-4,
                               atol=1e-5)
    assert not critic.backbone.training and not any(m.training for m in critic.modules()
                                                    if isinstance(m, torch.nn.Dropout))

    # the file: head + LoRA + log_tie and the settings (the backbone's resolved path), atomic, no backbone weights
    save_critic(critic, tmp_path / "c" / "critic.safetensors", extra={"note": "test"})
    assert critic_format(tmp_path / "c") == "vidpo-vlm-critic-1"
    assert not [p for p in (tmp_path / "c").iterdir() if p.name != "critic.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "critic.safetensors"), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert keys == set(critic.trainable_state()) and not any(".lora_" not in k and k.startswith("backbone") for k in keys)
    settings = json.loads(meta["settings"])
    assert settings["backbone"] == str(backbone.resolve()) and settings["lora_rank"] == 4 and meta["note"] == "test"
    again = load_critic(tmp_path / "c")
    assert isinstance(again, VLMCritic) and again.settings == critic.settings
    torch.testing.assert_close(score_clips(again, x, caps, SEG).video, plain.video)
    assert again.tie_parameter == pytest.approx(critic.tie_parameter)
    # a moved backbone is named at load time
    with pytest.raises(FileNotFoundError, match="critic.backbone"):
        load_critic(tmp_path / "c", backbone=str(tmp_path / "nowhere"))


def test_vlm_critic_learns_a_planted_flicker_preference(backbone, tmp_path):
    """Trained on 96 labelled pairs with the Bradley-Terry-with-ties loss (segment term on: the clean segment ties),
    it tells the flickering segment on 64 held-out pairs; saved and reloaded, it labels them as the 'critic'
    labeller and scores single videos for KTO."""
    cfg = vlm_cfg(backbone, "critic.steps=100", "critic.batch_size=16", "critic.lr=3e-3", "critic.warmup_steps=5",
                  "critic.segment_weight=1.0", "critic.granularity=segment")
    train, held = flicker_pairs(96, seed=1), flicker_pairs(64, seed=2)
    untrained = critic_accuracy(fresh_critic(backbone), held, None, SEG)
    critic, info = train_critic(cfg, train, None, SEG, device=torch.device("cpu"))
    assert info["kind"] == "vlm" and info["symmetries"] == ["identity"] and info["steps"] == 100
    acc = critic_accuracy(critic, held, None, SEG)
    seg_ci = mean_ci(acc["segment_correct"])
    assert acc["segment_n"] == 64 and acc["segment_accuracy"] > 0.8 and seg_ci["ci95"][0] > 0.5, (acc, seg_ci)
    assert acc["accuracy"] > 0.8 and acc["segment_accuracy"] > untrained["segment_accuracy"]
    # the same seed trains the same critic (every draw from named streams: init, batches, dropout)
    short = vlm_cfg(backbone, "critic.steps=4", "critic.batch_size=4")
    one, _ = train_critic(short, train.subset(range(8)), None, SEG, device=torch.device("cpu"))
    two, _ = train_critic(short, train.subset(range(8)), None, SEG, device=torch.device("cpu"))
    torch.testing.assert_close(score_clips(one, held.first[:4], held.captions[:4], SEG).segments,
                               score_clips(two, held.first[:4], held.captions[:4], SEG).segments)

    save_critic(critic, tmp_path / "critic" / "critic.safetensors")
    labeler = build_labeler("critic", cfg=load_config(None, [f"critic.checkpoint={tmp_path / 'critic'}",
                                                             "critic.granularity=segment", "critic.tie_margin=0"]))
    batch = PairBatch(first=held.first, second=held.second, captions=held.captions, pair_ids=held.pair_ids,
                      segment_ids=SEG, fps=FPS)
    result = labeler.label(batch)
    flicker = held.labels != 0
    assert result.labels.shape == (64, 2)
    assert float((result.labels[flicker] == held.labels[flicker]).double().mean()) == pytest.approx(
        acc["segment_accuracy"], abs=1e-9)
    # KTO: single videos scored per segment; a flickering segment scores below its clean counterpart
    points = labeler.label_pointwise(held.first, held.captions, SEG)
    assert points.shape == (64, 2)
    reloaded = open_critic(tmp_path / "critic")
    torch.testing.assert_close(points, score_clips(reloaded, held.first, held.captions, SEG).segments)
    margin = tie_margin_of(reloaded, None, 0.9)
    assert margin > 0 and math.isfinite(margin)


def test_a_vlm_critic_needs_a_backbone_and_valid_settings(backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="critic.backbone"):
        build_scorer(load_config(None, [f"critic.backbone={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"critic.backbone={backbone}", "critic.frames_per_segment=0", "critic.pooling=max",
                           "critic.instruction=no placeholder", "critic.lora_targets=[]"])
    text = str(err.value)
    for key in ("critic.frames_per_segment", "critic.pooling", "critic.instruction", "critic.lora_targets"):
        assert key in text, key
    # 'mean' pooling reads every non-padding token
    mean = fresh_critic(backbone, "critic.pooling=mean")
    with torch.no_grad():
        out = mean.score(clips(2, torch.Generator().manual_seed(0)), list(CAPTIONS[:2]), SEG)
    assert out.segments.shape == (2, 2) and torch.isfinite(out.segments).all()
