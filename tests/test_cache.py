"""`vidpo cache` with a tiny random Wan VAE and T5 encoder (saved with save_pretrained, loaded from local
directories): shards the trainer consumes, resumption after a kill, rank slices, bad clips by policy."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.video import encode_clip, make_frames

from vidpo.utils.provenance import SettingsMismatch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from vidpo.config import ConfigError, load_config  # noqa: E402
from vidpo.data.decode import SamplingSpec, VideoDecodeError, decode_clip  # noqa: E402
from vidpo.data.latents import LatentShardDataset, read_index  # noqa: E402
from vidpo.models.text_encoder import TextEncoder  # noqa: E402
from vidpo.models.vae import DiffusersVAE  # noqa: E402
from vidpo.stages.cache import run_cache

CAPTIONS = ["a red square moving left", "a blue circle moving up", "a green square moving right",
            "the red circle moving down"]
CACHE_SETTINGS = ["cache.fps=8", "cache.frames=9", "cache.height=32", "cache.width=32", "cache.text_max_length=8",
                  "cache.batch_size=2", "cache.dtype=float32", "cache.workers=1", "train.progress=false"]


def _tiny_models(root: Path):
    """A random AutoencoderKLWan (4 latent channels, 4x spatial and temporal compression) and a one-layer
    T5 encoder with a word-level tokenizer built offline."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                     latents_std=[2.0, 1.5, 1.0, 0.5], scale_factor_spatial=4).save_pretrained(root / "vae")
    words = ["<pad>", "</s>", "<unk>"] + sorted({w for c in CAPTIONS for w in c.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "t5")
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(root / "t5")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny models, 7 good clips (h264 and VP9, 12 frames of 40x48 at 8 fps), a missing one and a truncated
    one, listed in clips.jsonl; the folder itself (captions in .txt files) holds the 7 and the truncated one."""
    root = tmp_path_factory.mktemp("cache_ws")
    _tiny_models(root)
    lines = []
    for i in range(7):
        frames = make_frames(12, 40, 48)[::-1].copy() if i % 3 == 0 else make_frames(12, 40, 48)
        path = encode_clip(root / "clips" / f"c{i}", frames, "vp9" if i % 2 else "h264", fps=8, gop=4)
        lines.append({"clip_id": f"c{i}", "path": f"clips/{path.name}", "caption": CAPTIONS[i % 4]})
        path.with_suffix(".txt").write_text(CAPTIONS[i % 4])  # the folder form of the manifest
    truncated = root / "clips" / "broken.webm"
    truncated.write_bytes((root / "clips" / "c1.webm").read_bytes()[:600])
    truncated.with_suffix(".txt").write_text("a broken clip")
    lines.insert(2, {"clip_id": "gone", "path": "clips/missing.mp4", "caption": "x"})
    lines.insert(5, {"clip_id": "broken", "path": "clips/broken.webm", "caption": "y"})
    (root / "clips.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "recipe.yaml").write_text(f"cache:\n  manifest: {root / 'clips.jsonl'}\n  vae: {root / 'vae'}\n"
                                      f"  text_encoder: {root / 't5'}\n")
    return root


def _cfg(ws, *extra):
    return load_config(ws / "recipe.yaml", CACHE_SETTINGS + list(extra))


def _all_latents(out: Path) -> torch.Tensor:
    ds = LatentShardDataset(out)
    return ds.read(range(len(ds)))


def test_cache_writes_what_the_encoders_compute_and_trains(workspace, tmp_path):
    out = tmp_path / "cache"
    result = run_cache(_cfg(workspace, "cache.shard_size=3"), out)
    assert result["clips_encoded"] == 7 and result["clips_skipped"] == 2 and result["shards_written"] == 3
    index = read_index(out)
    assert index["num_samples"] == 7 and index["latent_shape"] == [4, 3, 8, 8] and index["text_shape"] == [8, 16]
    assert {s["clip_id"]: s["kind"] for s in index["skipped"]} == {"gone": "missing", "broken": "truncated"}
    assert all(str(workspace / "clips") in s["path"] for s in index["skipped"])

    # Sample 0 recomputed from scratch: decode -> VAE mean, normalised (z - mean) / std; T5 last hidden state.
    data = _all_latents(out)
    x = decode_clip(workspace / "clips" / "c0.mp4", SamplingSpec(fps=8, frames=9, height=32, width=32))
    vae = DiffusersVAE(workspace / "vae", torch.device("cpu"), torch.float32)
    raw = vae.vae.encode(x[None]).latent_dist.mean.double()
    mean = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor([2.0, 1.5, 1.0, 0.5], dtype=torch.float64).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(data["latents"][0].double(), ((raw - mean) / std)[0], rtol=1e-4, atol=1e-5)
    text = TextEncoder(workspace / "t5", workspace / "t5", torch.device("cpu"), torch.float32, 8)
    emb, mask = text.encode([CAPTIONS[0]])
    assert mask[0].tolist() == [True] * 6 + [False] * 2  # 5 words + </s>
    torch.testing.assert_close(data["text_emb"][0], emb[0])
    assert torch.all(data["text_emb"][0, 6:] == 0) and torch.equal(data["text_mask"][0], mask[0])

    # The trainer consumes the cache: a DiT sized by the index (4 latent channels, 16-wide text).
    from vidpo.stages.jobs import train_job

    summary = train_job(load_config(None, [
        "data.source=latents", f"data.shards={out}", "model.width=32", "model.depth=1", "model.num_heads=2",
        "model.patch_size=[1,2,2]", "train.max_steps=2", "train.batch_size=4", "train.progress=false",
        "data.workers=1"]), tmp_path / "run", resume=False)
    assert summary["steps"] == 2 and summary["samples_consumed"] == 8 and torch.isfinite(
        torch.tensor(summary["last"]["loss"]))


def test_killed_cache_resumes_without_redoing_finished_shards(workspace, tmp_path):
    """`vidpo cache` on the folder of clips, one clip per shard, SIGKILLed after its first shard; the rerun
    keeps every finished shard file as it was (same inode and mtime) and writes only the rest."""
    out = tmp_path / "cache"
    settings = CACHE_SETTINGS + ["cache.shard_size=1", f"cache.manifest={workspace / 'clips'}"]
    cmd = [sys.executable, "-m", "vidpo", "cache", str(workspace / "recipe.yaml"), "--out", str(out),
           *sum((["--set", s] for s in settings), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "shards" / "shard_00000.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p for p in (out / "shards").glob("shard_*.json"))
    assert done, "the cache process wrote no shard before it was killed"
    assert len(done) < 8, "the cache process finished before it could be killed midway"
    assert not (out / "index.json").exists()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()
              if p.with_suffix(".json").exists() and ".tmp-" not in p.name}

    result = run_cache(_cfg(workspace, *settings[len(CACHE_SETTINGS):]), out)
    assert result["shards_done_before"] == len(done)
    assert result["shards_written"] == 8 - len(done)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()}
    assert all(after[name] == stamp for name, stamp in before.items())  # finished shards untouched
    assert not any(".tmp-" in name for name in after)
    assert read_index(out)["num_samples"] == 7
    assert [s["clip_id"] for s in read_index(out)["skipped"]] == ["broken.webm"]
    again = run_cache(_cfg(workspace, *settings[len(CACHE_SETTINGS):]), out)
    assert again["shards_written"] == 0 and again["shards_done_before"] == 8


def test_ranks_take_their_slices(workspace, tmp_path):
    single = tmp_path / "single"
    run_cache(_cfg(workspace, "cache.shard_size=2"), single)
    split = tmp_path / "split"
    r0 = run_cache(_cfg(workspace, "cache.shard_size=2"), split, rank=0, world_size=2)
    assert r0["shards_mine"] == 3 and r0["index"] is None  # shards 0, 2, 4; rank 1's are missing
    assert sorted(p.name for p in (split / "shards").glob("*.json")) == [
        "shard_00000.json", "shard_00002.json", "shard_00004.json"]
    r1 = run_cache(_cfg(workspace, "cache.shard_size=2"), split, rank=1, world_size=2)
    assert r1["shards_mine"] == 2 and r1["index"] is not None
    a, b = _all_latents(single), _all_latents(split)
    assert LatentShardDataset(split).clip_ids == LatentShardDataset(single).clip_ids
    for key in a:
        assert torch.equal(a[key], b[key])


def test_settings_change_and_strict_policy(workspace, tmp_path):
    out = tmp_path / "cache"
    run_cache(_cfg(workspace, "cache.shard_size=4"), out)
    with pytest.raises(SettingsMismatch, match="frames differ"):
        run_cache(_cfg(workspace, "cache.shard_size=4", "cache.frames=5"), out)
    with pytest.raises(VideoDecodeError, match="missing.mp4: missing"):
        run_cache(_cfg(workspace, "cache.on_bad_input=raise"), tmp_path / "strict")
    with pytest.raises(ConfigError, match="needs 1 \\+ 4k frames"):
        run_cache(_cfg(workspace, "cache.frames=8"), tmp_path / "bad_frames")
    with pytest.raises(ConfigError, match="cache.vae"):
        run_cache(_cfg(workspace, f"cache.vae={tmp_path}"), tmp_path / "no_vae")
