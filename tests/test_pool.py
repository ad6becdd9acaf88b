"""A round's pool read on demand (vidpo.ipo.pool): the lazy videos index like the tensor they replace, a decoded
pool gives uint8 frames and float latents, scoring and pair writing never load a whole shard, the scorer gets the
pool in bounded chunks with the same scores, row reads name the file on bad input, and a critic's training pairs
too large for memory are read batch by batch and train the same critic."""
import json
from pathlib import Path

import pytest
import torch
from helpers.micro import MICRO
from helpers.pairs_dirs import brightness_clips, write_pairs_dir
from safetensors.torch import save_file

from vidpo.config import load_config
from vidpo.data.pairs import MANIFEST_FILE, PairDataError, PairRecord, ShardReader, read_manifest
from vidpo.data.video_io import frames_name
from vidpo.data.video_rows import VideoRows
from vidpo.ipo import pool as pool_module
from vidpo.ipo.pairing import build_ranked_pairs
from vidpo.ipo.pool import VideoPool, pool_chunks, pool_scores, pool_videos, read_pool
from vidpo.models.critic import CriticScores

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [[1, -1], [0, 1], [-1, -1], [1, 0], [1, 1]]   # 5 pairs, 2 shards of 3


@pytest.fixture
def pairs_dir(tmp_path):
    write_pairs_dir(tmp_path / "pairs", TARGETS, shard_size=3)
    return tmp_path / "pairs"


def expected_pool():
    first, second = brightness_clips(TARGETS)
    return torch.cat([first, second])


def test_lazy_videos_index_like_the_whole_pool(pairs_dir):
    whole = expected_pool()
    videos = pool_videos(pairs_dir)
    assert len(videos) == 10 and videos.shape == whole.shape and videos.dtype == torch.float32
    assert torch.equal(videos[:], whole) and torch.equal(videos[3], whole[3]) and torch.equal(videos[-1], whole[-1])
    assert torch.equal(videos[2:9:3], whole[2:9:3])
    index = torch.tensor([7, 0, 7, 4])
    assert torch.equal(videos[index], whole[index]) and torch.equal(videos[[9, 1]], whole[[9, 1]])
    view = videos.take([8, 2, 5])
    assert len(view) == 3 and torch.equal(view[:], whole[[8, 2, 5]]) and torch.equal(view.take([2, 0])[:], whole[[5, 8]])
    assert videos[[]].shape == (0, *whole.shape[1:])
    with pytest.raises(TypeError, match="1-D integer index"):
        videos[torch.ones(10, dtype=torch.bool)]
    loaded, cond = read_pool(pairs_dir)
    assert torch.equal(loaded, whole) and cond.shape == (10, 0)


def write_decoded_pool(root: Path, pairs: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded latent pairs directory: 16-channel latents in shards/, uint8 frames in frames/."""
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, pairs, 16, 2, 4, 4, generator=gen)
    frames = torch.randint(0, 256, (2, pairs, 3, 5, 8, 8), generator=gen, dtype=torch.uint8)
    shard = "shards/shard_00000.safetensors"
    (root / "shards").mkdir(parents=True)
    (root / "frames").mkdir()
    save_file({"first": latents[0].contiguous(), "second": latents[1].contiguous()}, str(root / shard))
    save_file({"first": frames[0].contiguous(), "second": frames[1].contiguous()}, str(root / frames_name(shard)))
    lines = [json.dumps({"pair_id": f"p{i}", "shard": shard, "row": i, "caption": f"clip {i}"}) for i in range(pairs)]
    (root / "pairs.jsonl").write_text("".join(line + "\n" for line in lines))
    return torch.cat(list(latents)), torch.cat(list(frames))


def test_a_decoded_pool_gives_its_frames_to_score_and_its_latents_to_train(tmp_path):
    latents, frames = write_decoded_pool(tmp_path)
    records, _ = read_manifest(tmp_path / "pairs.jsonl", need_labels=False)
    pixels, lat = pool_module._videos(tmp_path, records, "pixels"), pool_module._videos(tmp_path, records, "latents")
    assert isinstance(pixels, VideoRows) and pixels.dtype == torch.uint8 and torch.equal(pixels[:], frames)
    assert lat.dtype == torch.float32 and lat.shape == latents.shape and torch.equal(lat[[5, 0]], latents[[5, 0]])


def no_whole_shards(monkeypatch):
    def refuse(self, name, pair_id="?"):
        raise AssertionError(f"a whole shard was loaded: {name}")
    monkeypatch.setattr(ShardReader, "shard", refuse)


def brightness_scorer(seen: list):
    """Scores a clip by its mean brightness per frame (segments of 2 frames); records each call's batch size."""
    def score(videos, captions, cond):
        seen.append(videos.shape[0])
        frames = videos.float().mean(dim=(1, 3, 4))
        return CriticScores(frames=frames, segments=frames.reshape(frames.shape[0], 2, 2).mean(-1),
                            video=frames.mean(1))
    return score


def test_scoring_and_pair_writing_read_rows_alone_in_bounded_chunks(pairs_dir, tmp_path, monkeypatch):
    records, _ = read_manifest(pairs_dir / "pairs.jsonl", need_labels=False)
    pixels, latents = pool_module._videos(pairs_dir, records, "pixels"), pool_module._videos(pairs_dir, records, "latents")
    keys = torch.tensor([0, 1, 0, 1, 0] * 2)
    pool = VideoPool(pixels=pixels, latents=latents, captions=[r.caption for r in records] * 2,
                     prompt_ids=[None] * 10, cond_ids=torch.zeros(10, 0, dtype=torch.long), keys=keys)
    no_whole_shards(monkeypatch)

    whole_calls, chunked_calls = [], []
    whole = pool_scores(brightness_scorer(whole_calls), pool)
    video_bytes = pixels.nbytes_per_video()
    chunked = pool_scores(brightness_scorer(chunked_calls), pool, chunk_bytes=3 * video_bytes + 1)
    assert whole_calls == [10] and chunked_calls == [3, 3, 3, 1]
    assert torch.equal(whole.video, chunked.video) and torch.equal(whole.segments, chunked.segments)
    assert [list(r) for r in pool_chunks(pixels, video_bytes // 2)] == [[i] for i in range(10)]

    cfg = load_config(ROOT / "recipes" / "shapes" / "dpo_demo.yaml", MICRO)
    segment_ids = torch.tensor([0, 0, 1, 1])
    scorer_calls = []
    stats = build_ranked_pairs(brightness_scorer(scorer_calls), pool, tmp_path / "ranked", cfg, segment_ids, 0.5)
    assert stats["pairs"] > 0 and scorer_calls == [10]
    written, _ = read_manifest(tmp_path / "ranked" / MANIFEST_FILE)
    monkeypatch.undo()
    reader = ShardReader(tmp_path / "ranked")
    brightness = whole.video
    for record in written:   # each pair holds the pool's videos, the brighter one first
        first, second = reader.get(record, "first"), reader.get(record, "second")
        a = next(i for i in range(10) if torch.equal(pool.latents[i], first))
        b = next(i for i in range(10) if torch.equal(pool.latents[i], second))
        assert keys[a] == keys[b] and brightness[a] > brightness[b]


def test_row_reads_name_the_file_on_bad_input(pairs_dir):
    reader = ShardReader(pairs_dir, rows_only=True)
    good = PairRecord(pair_id="p0001", shard="shards/shard_00000.safetensors", row=1)
    assert torch.equal(reader.get(good, "second"), brightness_clips(TARGETS)[1][1])
    with pytest.raises(PairDataError, match=r"shard_00001.safetensors: pair p0009 row 7 out of range \(2 rows\)"):
        reader.get(PairRecord(pair_id="p0009", shard="shards/shard_00001.safetensors", row=7), "first")
    with pytest.raises(PairDataError, match="no tensor 'gt'"):
        reader.get(good, "gt")
    with pytest.raises(PairDataError, match="shard_00007.safetensors: shard missing"):
        reader.get(PairRecord(pair_id="p0", shard="shards/shard_00007.safetensors", row=0), "first")
    (pairs_dir / "shards" / "shard_00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PairDataError, match="shard_00001.safetensors: shard unreadable"):
        ShardReader(pairs_dir, rows_only=True).get(PairRecord(pair_id="p0003", shard="shards/shard_00001.safetensors", row=0), "first")


def test_a_critic_trains_the_same_on_pairs_read_batch_by_batch(tmp_path, micro_overrides, monkeypatch):
    from test_critic import _colour_pairs, _write_pairs

    from vidpo.ipo.critic import PreferenceData, load_preference_data, train_critic
    from vidpo.labeling.critic import score_videos
    from vidpo.training.modeling import build_world

    over = micro_overrides + ["critic.width=16", "critic.num_heads=2", "critic.depth=1", "critic.steps=6",
                              "critic.batch_size=8", "critic.warmup_steps=1"]
    cfg = load_config(None, over)
    world = build_world(cfg)
    seg = torch.tensor([0, 0, 1, 1])
    _write_pairs(tmp_path, *_colour_pairs(world, 24, 0), world, 2)
    loaded = load_preference_data(tmp_path, 2)
    lazy = load_preference_data(tmp_path, 2, memory_bytes=0)
    assert isinstance(loaded.first, torch.Tensor) and isinstance(lazy.first, VideoRows)
    assert torch.equal(lazy.first[:], loaded.first) and torch.equal(lazy.second[:], loaded.second)
    part = lazy.subset([5, 1, 9])
    assert isinstance(part.first, VideoRows) and torch.equal(part.second[:], loaded.second[[5, 1, 9]])
    joined = PreferenceData.concat([lazy.subset(range(4)), loaded.subset(range(4, 6))])
    assert isinstance(joined.first, VideoRows) and torch.equal(joined.first[:], loaded.first[:6])
    with monkeypatch.context() as patched:
        no_whole_shards(patched)
        critic_lazy, _ = train_critic(cfg, lazy, world, seg, device=torch.device("cpu"))
    critic, _ = train_critic(cfg, loaded, world, seg, device=torch.device("cpu"))
    for key, value in critic.state_dict().items():
        assert torch.equal(critic_lazy.state_dict()[key], value), key
    assert torch.equal(score_videos(critic_lazy, lazy.first, lazy.cond_ids, world, seg).video,
                       score_videos(critic, loaded.first, loaded.cond_ids, world, seg).video)
