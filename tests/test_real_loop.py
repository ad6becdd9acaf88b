"""The real loop end to end on CPU: a released model directory and a prompt file in, ``vidpo run``, and out come
cached prompt embeddings, pairs decoded to mp4s by the model's VAE, VLM segment labels from a real HTTP server,
a DenseDPO LoRA that diffusers loads, and a judged evaluation.

Every model is a tiny random one laid out as released (tests/helpers/pipelines.py): Wan 2.1, the Wan 2.2
two-expert layout and CogVideoX-2B. The real clips are mp4s encoded here; the VLM is the stub server of
tests/helpers/vlm_server.py on 127.0.0.1, judging segments by brightness.
"""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.pipelines import PROMPTS_FOR_TESTS, TEXT_DIM, diffusers_pipeline, make_cogvideox_dir, make_wan_dir  # noqa: E402
from helpers.video import encode_clip, make_frames  # noqa: E402
from helpers.vlm_server import FakeVLM, Reply, brightness_verdict  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("av")

from vidpo.cli import main as cli  # noqa: E402
from vidpo.config import load_config  # noqa: E402
from vidpo.data.pairs import MANIFEST_FILE, read_manifest  # noqa: E402
from vidpo.data.prompts import PromptEmbeddings  # noqa: E402
from vidpo.data.video_io import read_mp4  # noqa: E402
from vidpo.models.lora import lora_modules  # noqa: E402
from vidpo.training import checkpoint as ckpt  # noqa: E402
from vidpo.training.policy import prepare_policy  # noqa: E402

RECIPE = "recipes/wan/tiny_cpu.yaml"
BUILDERS = {"wan2.1": lambda p: make_wan_dir(p, prompts=PROMPTS_FOR_TESTS),
            "wan2.2-a14b": lambda p: make_wan_dir(p, two_experts=True, prompts=PROMPTS_FOR_TESTS),
            "cogvideox-2b": lambda p: make_cogvideox_dir(p, prompts=PROMPTS_FOR_TESTS)}
KIND = {"wan2.1": "wan", "wan2.2-a14b": "wan", "cogvideox-2b": "cogvideox"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prompt file whose every prompt names a real clip (h264, 12 frames of 40 x 48 at 8 fps), two held out."""
    root = tmp_path_factory.mktemp("real_loop")
    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS):
        clip = encode_clip(root / "clips" / f"c{i}", make_frames(12, 40, 48), "h264", fps=8)
        row = {"id": f"p{i}", "prompt": text, "clip": f"clips/{clip.name}"}
        if i >= len(PROMPTS_FOR_TESTS) - 2:
            row["split"] = "heldout"
        if i == 1:
            row["negative_prompt"] = "blurry, low quality"
        rows.append(row)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def vlm():
    server = FakeVLM()
    server.behaviour = lambda request: Reply(text=brightness_verdict(request, margin=0.5))
    yield server
    server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def run_args(workspace, model_dir, vlm, out, *extra):
    args = ["run", RECIPE, "--out", str(out), "--set", f"model.path={model_dir}",
            "--set", f"prompts.path={workspace / 'prompts.jsonl'}", "--set", f"label.vlm.base_url={vlm.base_url}"]
    for item in extra:
        args += ["--set", item]
    return args


def engine_policy(out):
    """The trained policy of run ``out``: the release with the run's LoRA, as training left it."""
    cfg = load_config(out / "config.yaml")
    model, _, _, _ = prepare_policy(cfg, None, torch.device("cpu"))
    ckpt.load_weights(model, out)
    return model.eval()


@pytest.mark.parametrize("release", list(BUILDERS))
def test_vidpo_run_over_a_release_and_a_prompt_file(workspace, vlm, release, tmp_path):
    model_dir = BUILDERS[release](tmp_path / release)
    out = tmp_path / "run"
    assert cli(run_args(workspace, model_dir, vlm, out, f"model.kind={KIND[release]}")) == 0
    summary = json.loads((out / "summary.json").read_text())

    # prompt embeddings cached once by the model's own text encoder, keyed by prompt id
    index = next((out / "prompt_embeddings").rglob("index.json"))
    embeddings = PromptEmbeddings(index.parent)
    assert sorted(embeddings.ids) == sorted(f"p{i}" for i in range(len(PROMPTS_FOR_TESTS)))

    # pairs decoded to mp4s by the VAE, read back at the configured frame count and size; segment labels
    records, problems = read_manifest(out / "pairs" / MANIFEST_FILE)
    assert len(records) == 8 and not problems
    assert all(r.prompt_id in {f"p{i}" for i in range(6)} and len(r.labels) == 2 for r in records)
    for key in ("first", "second"):
        video = read_mp4(out / "pairs" / "videos" / f"{records[0].pair_id}_{key}.mp4")
        assert video.shape[1] == 9 and video.shape[2] * 32 == video.shape[3] * 32  # 9 frames, square, upscaled
    assert (out / "pairs" / "index.html").is_file()
    assert summary["labels"]["labeler"] == "vlm" and summary["labels"]["tie_fraction"] < 1.0
    assert summary["train"]["steps"] == 4

    # the judged evaluation: base vs policy on held-out prompts, win rate with its interval over prompts
    judged = summary["judged"]
    assert judged["judge"] == "vlm" and judged["videos"] == 4 and judged["failed"] == 0
    assert not (out / "eval" / "frames").exists()    # the frames the judge read are removed once it has judged
    lo, hi = judged["win_rate"]["ci95"]
    assert lo <= judged["win_rate"]["mean"] <= hi and judged["wins"] + judged["ties"] + judged["losses"] == 4
    assert {p["prompt_id"] for p in json.loads((out / "eval" / "judged.json").read_text())["pairs"]} <= {"p6", "p7"} \
        | {f"p{i}" for i in range(6)}
    assert "policy" in (out / "report.html").read_text()

    # OUT/lora loads into the release's own diffusers pipeline with every adapter, and its transformer with the
    # adapters equals the engine's policy on fixed inputs
    from peft.tuners.lora import LoraLayer

    policy = engine_policy(out)
    pipe = diffusers_pipeline(model_dir)
    pipe.load_lora_weights(str(out / "lora"))
    experts = dict(policy.experts())
    assert sum(isinstance(m, LoraLayer) for m in pipe.transformer.modules()) \
        == len(list(lora_modules(experts["transformer"])))
    if "transformer_2" in experts:
        pipe.load_lora_weights(str(out / "lora" / "transformer_2"), load_into_transformer_2=True)
        assert sum(isinstance(m, LoraLayer) for m in pipe.transformer_2.modules()) \
            == len(list(lora_modules(experts["transformer_2"])))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    cond = torch.randn(2, 8, TEXT_DIM, generator=g)
    t = torch.tensor([0.95, 0.3])     # one row per expert of a two-expert model
    with torch.no_grad():
        got = policy(x, t, cond)
        want = torch.cat([diffusers_forward(pipe, release, x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def diffusers_forward(pipe, release, x, t, cond):
    """The release's transformer called as its pipeline calls it, for one row at engine time ``t``."""
    if release.startswith("cogvideox"):
        k = (t * (pipe.scheduler.config.num_train_timesteps - 1)).round().long()
        out = pipe.transformer(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=k, encoder_hidden_states=cond,
                               return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)
    transformer = pipe.transformer
    boundary = pipe.config.boundary_ratio
    if boundary is not None and float(t) * 1000 < boundary * 1000:
        transformer = pipe.transformer_2
    return transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond, return_dict=False)[0]


def test_structural_pairs_start_from_the_prompts_real_clips(workspace, vlm, tmp_path):
    model_dir = BUILDERS["wan2.1"](tmp_path / "wan")
    out = tmp_path / "run"
    assert cli(run_args(workspace, model_dir, vlm, out, "generate.mode=structural", "eval.judge=none")) == 0
    from safetensors.torch import load_file

    shard = load_file(str(out / "pairs" / "shards" / "shard_00000.safetensors"))
    assert shard["gt"].shape == shard["first"].shape == (4, 16, 3, 4, 4) and "eta" in shard
    records, _ = read_manifest(out / "pairs" / MANIFEST_FILE)
    assert all(r.mode == "structural" and r.eta is not None for r in records)
    clips = json.loads((out / "clips" / "latents" / "index.json").read_text())
    assert clips["num_samples"] == len(PROMPTS_FOR_TESTS)
    assert (out / "pairs" / "videos" / f"{records[0].pair_id}_first.mp4").is_file()
    assert "judged" not in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("case", ["empty_line", "duplicate_id", "missing_clip", "no_vae", "other_family"])
def test_bad_input_is_one_clear_error_before_any_model_work(workspace, vlm, tmp_path, capsys, case):
    model_dir = BUILDERS["wan2.1"](tmp_path / "wan")
    prompts = workspace / "prompts.jsonl"
    extra = []
    if case in ("empty_line", "duplicate_id", "missing_clip"):
        # copies elsewhere: each line's clip as an absolute path, so only the planted mistake is wrong
        lines = [json.dumps({**row, "clip": str(workspace / row["clip"])})
                 for row in map(json.loads, prompts.read_text().splitlines())]
        if case == "empty_line":
            lines.insert(2, "")
            lines.append(lines[0])            # the blank line is only skipped in JSONL: make it a text file
            prompts = tmp_path / "prompts.txt"
            lines = [json.loads(line)["prompt"] if line else "" for line in lines[:-1]]
        elif case == "duplicate_id":
            lines.append(lines[0])
            prompts = tmp_path / "prompts.jsonl"
        else:
            row = json.loads(lines[0])
            row["clip"] = str(workspace / "clips" / "nowhere.mp4")
            lines[0] = json.dumps(row)
            prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("\n".join(lines) + "\n")
    elif case == "no_vae":
        import shutil

        shutil.rmtree(model_dir / "vae")
    else:
        model_dir = make_cogvideox_dir(tmp_path / "cog", prompts=PROMPTS_FOR_TESTS)
    out = tmp_path / "run"
    args = run_args(workspace, model_dir, vlm, out, *extra)
    args[args.index(f"prompts.path={workspace / 'prompts.jsonl'}")] = f"prompts.path={prompts}"
    capsys.readouterr()   # what building the model directories printed
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vidpo run: error: ")
    expected = {"empty_line": f"{prompts}:3", "duplicate_id": f"{prompts}:{len(PROMPTS_FOR_TESTS) + 1}",
                "missing_clip": f"{prompts}:1", "no_vae": "vae", "other_family": "cogvideox"}[case]
    assert expected in err[0], err[0]
    assert not (out / "pairs").exists() and not (out / "prompt_embeddings").exists()


def test_torchrun_generates_the_same_pairs_and_exports_the_same_lora(workspace, vlm, tmp_path):
    """``torchrun --nproc-per-node 2 -m vidpo run`` slices every stage over its ranks (prompt embeddings, pair
    shards, decoding; training data parallel over FSDP2): its pairs and labels equal one process's bit for bit,
    and its LoRA loads into diffusers with every adapter and equals the one-process export up to the order in
    which the data-parallel gradients are summed (4 AdamW steps)."""
    import subprocess
    import sys

    from helpers.distributed import free_port
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    pytest.importorskip("megatron.core")
    model_dir = BUILDERS["wan2.1"](tmp_path / "wan")
    single, multi = tmp_path / "single", tmp_path / "torchrun"
    one_per_batch = "generate.decode_batch_size=1"    # 4 decode batches per model: both ranks decode
    assert cli(run_args(workspace, model_dir, vlm, single, one_per_batch)) == 0
    sets = run_args(workspace, model_dir, vlm, multi, one_per_batch)[2:]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "run", RECIPE, *sets]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    for split in ("pairs", "pairs_heldout"):
        for shard in sorted((single / split / "shards").iterdir()):
            a, b = load_file(str(shard)), load_file(str(multi / split / "shards" / shard.name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard
    assert (single / "pairs" / MANIFEST_FILE).read_text() == (multi / "pairs" / MANIFEST_FILE).read_text()
    one, two = (load_file(str(run / "lora" / "pytorch_lora_weights.safetensors")) for run in (single, multi))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=5e-5)
    pipe = diffusers_pipeline(model_dir)
    pipe.load_lora_weights(str(multi / "lora"))
    assert sum(isinstance(m, LoraLayer) for m in pipe.transformer.modules()) == len(one) // 2
    # The judged evaluation's sampling is split over the ranks (each samples every other video) and gathered on
    # every rank: the initial policy's videos are one process's, frame for frame, and every video is judged once.
    videos = sorted(p.name for p in (single / "eval" / "videos").iterdir())
    assert videos == sorted(p.name for p in (multi / "eval" / "videos").iterdir()) and len(videos) == 8
    for name in (v for v in videos if v.endswith("_base.mp4")):
        assert torch.equal(read_mp4(single / "eval" / "videos" / name), read_mp4(multi / "eval" / "videos" / name))
    judged = [json.loads((run / "summary.json").read_text())["judged"] for run in (single, multi)]
    assert judged[0]["videos"] == judged[1]["videos"] == 4 and judged[1]["failed"] == 0
    # ... and so is the decoding (each rank decodes every other batch, so the base mp4s above came from both ranks);
    # rank 0 judged from the frames both ranks wrote, then removed them
    assert not (multi / "eval" / "frames").exists()


@pytest.mark.parametrize("layout", [("parallel.tp=2", "parallel.sp=true"), ("parallel.cp=2", "generate.frames=13")],
                         ids=["tp2-sp", "cp2"])
def test_torchrun_samples_with_the_model_parallel_layout(workspace, vlm, tmp_path, layout):
    """``torchrun --nproc-per-node 2 -m vidpo generate`` with TP (+ SP) or CP = 2: both ranks sample every shard
    together with the policy split over them (tokens or weights), rank 0 saves it; the pairs equal one process's
    up to the order of the split sums (the sampler's 4 Euler steps through the tiny release)."""
    import subprocess
    import sys

    from helpers.distributed import free_port
    from safetensors.torch import load_file

    pytest.importorskip("megatron.core")
    model_dir = BUILDERS["wan2.1"](tmp_path / "wan")
    sets = run_args(workspace, model_dir, vlm, tmp_path / "unused")[4:]   # the --set overrides only
    sets += [a for item in layout if item.startswith("generate.") for a in ("--set", item)]  # 13 frames: 4 latent
    recipe = RECIPE
    if "parallel.tp=2" in layout:   # LoRA adapters are not tensor parallel: a full fine-tuning recipe
        recipe = tmp_path / "full.yaml"
        recipe.write_text(f"base: {os.path.abspath(RECIPE)}\nlora: null\npref: {{reference: frozen_copy}}\n")
    one, two = tmp_path / "one" / "pairs", tmp_path / "two" / "pairs"
    assert cli(["generate", str(recipe), "--out", str(one), *sets]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "generate", str(recipe), "--out", str(two), *sets,
               *[a for item in layout + ("cluster.gpus_per_node=2",) for a in ("--set", item)]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    shards = sorted((one / "shards").iterdir())
    assert [p.name for p in shards] == sorted(p.name for p in (two / "shards").iterdir()) and shards
    for shard in shards:
        a, b = load_file(str(shard)), load_file(str(two / "shards" / shard.name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=f"{shard.name}:{key}")
    info = json.loads((two / "generate.json").read_text())
    assert info["shards_written"] == len(shards) and info["shards_skipped"] == 0   # each shard saved once
    assert (info["sampling_groups"], info["ranks_per_group"]) == (1, 2)           # by both ranks together
    assert (one / "pairs.jsonl").read_text() == (two / "pairs.jsonl").read_text()
