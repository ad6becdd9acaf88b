"""``vidpo scale`` for the diffusers releases (vidpo.cluster.arch): architectures read from a release directory or
the published table, exact parameter counts, the per-block table of saved tensors checked against the real
diffusers blocks, and the whole prediction checked against the measured peak memory of a training step.

Peak memory, measured (CPU): the step (the DenseDPO preference step: policy forward on the pair's two videos,
reference forward without gradient, the loss kernel, backward) runs under ``torch.profiler`` with
``profile_memory=True``; the ``[memory]`` events of the profiler's kineto results are every allocation (+) and free
(-) in order, so their running sum is the bytes the step holds beyond what existed before it, and its maximum is the
step's peak. What loading left allocated (weights, LoRA, a frozen reference copy, buffers) is measured the same
way around ``prepare_policy``. Measured = loaded + peak; predicted = parameters + lora + reference + gradients +
activations (the optimizer does not step, so its states are not in either). With a GPU the same comparison uses
``torch.cuda.max_memory_allocated``.
"""
import glob
import json
import re
from pathlib import Path

import pytest
import torch
from helpers.pipelines import make_cogvideox_dir, make_wan_dir
from torch.profiler import ProfilerActivity, profile

from vidpo import kernels
from vidpo.cli import main as cli
from vidpo.cluster.arch import (
    CLASSES,
    RELEASES,
    Architecture,
    ArchitectureError,
    Precision,
    block_entries,
    count_parameters,
    lora_saved_bytes,
    recognise_release,
    resolve_architecture,
    saved_bytes,
)
from vidpo.cluster.scale import GIB, default_world, estimate, format_report
from vidpo.config import REPO_ROOT, load_config
from vidpo.models import flow
from vidpo.models.lora import apply_lora, mark_only_lora_trainable
from vidpo.training.policy import prepare_policy

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return make_wan_dir(tmp_path_factory.mktemp("scale") / "wan", num_layers=6)


@pytest.fixture(scope="module")
def cogvideox_dir(tmp_path_factory):
    return make_cogvideox_dir(tmp_path_factory.mktemp("scale") / "cog", num_layers=2)


# ----- architectures and parameters -------------------------------------------------------------------------------
def test_published_releases_count_their_parameters_on_the_meta_device():
    billions = {name: count_parameters(resolve_architecture(rel.family, None, name)).total / 1e9
                for name, rel in RELEASES.items()}
    assert billions == pytest.approx({"wan2.1-t2v-1.3b": 1.419, "wan2.1-t2v-14b": 14.288, "wan2.2-ti2v-5b": 5.000,
                                      "wan2.2-t2v-a14b": 14.288, "cogvideox-2b": 1.694, "cogvideox-5b": 5.570},
                                     abs=1e-3)
    assert resolve_architecture("wan", None, "wan2.2-t2v-a14b").experts == 2
    assert recognise_release("checkpoints/Wan2.1-T2V-1.3B-Diffusers") == "wan2.1-t2v-1.3b"
    assert recognise_release("/models/Wan2.2-TI2V-5B-Diffusers") == "wan2.2-ti2v-5b"
    assert recognise_release("checkpoints/CogVideoX-5b") == "cogvideox-5b"
    with pytest.raises(ArchitectureError, match="pass --arch"):
        resolve_architecture("wan", "checkpoints/no-such-model")
    with pytest.raises(ArchitectureError, match="not model.kind"):
        resolve_architecture("cogvideox", None, "wan2.1-t2v-14b")


@pytest.mark.parametrize("variant", ["wan", "wan_a14b", "wan_ti2v", "cogvideox"])
def test_a_release_directory_is_read_and_counted_exactly(tmp_path, variant):
    if variant == "cogvideox":
        path, kind = make_cogvideox_dir(tmp_path / "m", layout="5b", num_layers=2), "cogvideox"
    else:
        path, kind = make_wan_dir(tmp_path / "m", two_experts=variant == "wan_a14b", ti2v=variant == "wan_ti2v",
                                  num_layers=2), "wan"
    arch = resolve_architecture(kind, str(path))
    assert arch.source == str(path / "transformer" / "config.json")
    assert arch.experts == (2 if variant == "wan_a14b" else 1)
    assert arch.spatial_compression == (16 if variant == "wan_ti2v" else 8) and arch.temporal_compression == 4
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    cls = CogVideoXTransformer3DModel if kind == "cogvideox" else WanTransformer3DModel
    real = cls.from_pretrained(str(path / "transformer"))
    count = count_parameters(arch, 4, TARGETS)
    assert count.total == sum(p.numel() for p in real.parameters())
    apply_lora(real, rank=4, alpha=4.0, target_modules=list(TARGETS))
    assert count.lora == sum(p.numel() for n, p in real.named_parameters() if "lora_" in n)


# ----- the block table against the real blocks' saved tensors ----------------------------------------------------
def saved_tensor_bytes(model, *args, **kwargs) -> int:
    """Bytes of the distinct storages the autograd graph of ``model(...)`` keeps (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out = model(*args, return_dict=False, **kwargs)[0]
    seen, stack, visited = {}, [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for attr in dir(fn):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(fn, attr)
            except RuntimeError:
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in fn.next_functions)
    return sum(seen.values())


def one_block_bytes(arch: Architecture, dtype, lora: bool, frames: int, size: int, text: int) -> int:
    def run(layers):
        import diffusers

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = getattr(diffusers, CLASSES[arch.family])(**dict(arch.config, num_layers=layers)).to(dtype)
        if lora:
            apply_lora(model, rank=4, alpha=4.0, target_modules=list(TARGETS))
            mark_only_lora_trainable(model)
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(2, text, 16, generator=g).to(dtype)
        if arch.family == "wan":
            x = torch.randn(2, 16, frames, size, size, generator=g).to(dtype)
            return saved_tensor_bytes(model, x, torch.tensor([500.0, 500.0]), emb)
        x = torch.randn(2, frames, 16, size, size, generator=g).to(dtype)
        return saved_tensor_bytes(model, x, emb, torch.tensor([500, 500]))
    return run(2) - run(1)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_block_table_is_what_the_diffusers_block_saves(family, lora, dtype):
    text, frames, size = 8, 4, 16
    if family == "wan":
        config = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=24, in_channels=16,
                      out_channels=16, text_dim=16, freq_dim=32, ffn_dim=160)
    else:
        config = dict(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16, time_embed_dim=16,
                      text_embed_dim=16, sample_width=size, sample_height=size, sample_frames=4 * frames - 3,
                      patch_size=2, max_text_seq_length=text)
    arch = Architecture("tiny", family, dict(config, num_layers=1), 1, 4, 8, text, "test")
    measured = one_block_bytes(arch, dtype, lora, frames, size, text)
    c = 4 if dtype == torch.float32 else 2
    precision = Precision(compute=c, autocast=c)          # no autocast: LayerNorms run in the model's dtype
    video_entries, text_entries = block_entries(arch)
    n = frames * (size // 2) ** 2
    video = saved_bytes(video_entries, arch, precision, full=not lora)
    per_text = saved_bytes(text_entries, arch, precision, full=not lora)
    if lora:
        count = count_parameters(arch, 4, TARGETS)
        lora_video, lora_text = lora_saved_bytes(arch, count, 4, precision)
        video += lora_video
        per_text += lora_video if arch.joint_text else lora_text
    predicted = 2 * (n * video + text * per_text)
    assert measured == pytest.approx(predicted, rel=0.02)


# ----- the prediction against the measured peak of a training step ----------------------------------------------
def step_config(tmp_path: Path, wan: Path, *, lora: bool, checkpointing: str, dtype: str = "float32"):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{kind: wan, path: {wan}, dtype: {dtype}}}\n"
        "generate: {frames: 17, height: 128, width: 128}\n"     # 5 x 16 x 16 latents, 320 tokens per video
        "train: {objective: dense_dpo, batch_size: 1, autocast: 'off'}\n"
        f"parallel: {{activation_checkpointing: {checkpointing}}}\n"
        f"pref: {{reference: {'lora_disabled' if lora else 'frozen_copy'}}}\n"
        + ("lora: {rank: 4, alpha: 4.0, target_modules: [to_q, to_k, to_v, to_out.0]}\n" if lora else ""))
    return load_config(str(recipe))


def _allocated(prof) -> list:
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def measure_step(cfg, device: str, text_tokens: int) -> tuple[int, int]:
    """(bytes loading the policy and its reference left allocated, peak bytes of one preference step above that)."""
    dev = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    with profile(activities=activities, profile_memory=True) as load:
        model, reference, _, _ = prepare_policy(cfg, None, dev)
    loaded = (torch.cuda.memory_allocated() - before if dev.type == "cuda"
              else sum(b for _, b in _allocated(load)))
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)

    def step():
        x0 = torch.randn(2, 16, 5, 16, 16, generator=g).to(dev)
        noise = torch.randn(1, 16, 5, 16, 16, generator=g).to(dev)
        t = torch.full((2,), 0.5, device=dev)
        emb = torch.randn(1, text_tokens, 16, generator=g).to(dev, dtype).expand(2, -1, -1)
        x_t = flow.interpolate(x0, torch.cat([noise, noise]), t)
        v = model(x_t, t, emb)
        v_ref = reference(x_t, t, emb)
        out = kernels.dense_dpo_loss(v, v_ref.to(v.dtype), None, torch.tensor([[1]], device=dev),
                                     torch.zeros(5, dtype=torch.long, device=dev), 500.0, x0=x0.to(v.dtype),
                                     noise=noise.to(v.dtype))
        out.loss.backward()
    step()                          # lazy initialisation happens outside the measurement
    for p in model.parameters():
        p.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return loaded, torch.cuda.max_memory_allocated() - base
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    running = peak = 0
    for _, nbytes in _allocated(prof):
        running += nbytes
        peak = max(peak, running)
    return loaded, peak


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lora,checkpointing,dtype", [
    (True, "none", "float32"), (True, "full", "float32"), (False, "none", "float32"), (False, "full", "float32"),
    (True, "none", "bfloat16"), (True, "full", "bfloat16")])
def test_prediction_matches_the_measured_peak_of_a_training_step(tmp_path, wan_dir, device, lora, checkpointing,
                                                                 dtype):
    text = 8
    cfg = step_config(tmp_path, wan_dir, lora=lora, checkpointing=checkpointing, dtype=dtype)
    est = estimate(cfg, 1, cond_len=text)
    m = {k: v * GIB for k, v in est.memory_gib.items()}
    loaded, peak = measure_step(cfg, device, text)
    predicted = m["parameters"] + m["lora"] + m["reference"] + m["gradients"] + m["activations"]
    assert m["activations"] > 10 * (m["parameters"] + m["lora"])   # the comparison is about activations
    assert loaded + peak == pytest.approx(predicted, rel=0.15)
    other = estimate(step_config(tmp_path, wan_dir, lora=lora, dtype=dtype,
                                 checkpointing="none" if checkpointing == "full" else "full"), 1, cond_len=text)
    assert est.activations_gib["checkpointing " + checkpointing] == pytest.approx(est.memory_gib["activations"])
    assert other.memory_gib["activations"] == pytest.approx(
        est.activations_gib["checkpointing " + ("none" if checkpointing == "full" else "full")])


# ----- every recipe ------------------------------------------------------------------------------------------------
RECIPES = sorted(str(Path(p).relative_to(REPO_ROOT)) for pattern in ("wan", "cogvideox", "cluster")
                 for p in glob.glob(str(REPO_ROOT / "recipes" / pattern / "*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_prints_memory_and_communication_per_gpu(recipe, request, capsys):
    cfg = load_config(str(REPO_ROOT / recipe))
    extra = []
    if cfg.model.kind != "dit" and recognise_release(cfg.model.path) is None:
        # the tiny CPU recipes: their model is a tiny release of their family
        tiny = request.getfixturevalue("wan_dir" if cfg.model.kind == "wan" else "cogvideox_dir")
        extra = ["--set", f"model.path={tiny}"]
    status = cli(["scale", str(REPO_ROOT / recipe), *extra])
    report = capsys.readouterr().out
    assert status == 0, report
    assert "| activations |" in report and "(fits; 10% kept free)" in report and "communication" in report
    assert cli(["scale", str(REPO_ROOT / recipe), "--json", *extra]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["params"] > 0 and data["memory_gib"]["activations"] > 0
    if data["world"] > 1:
        assert data["communication"] and all(r["seconds"] >= 0 for r in data["communication"])
    if cfg.model.kind != "dit" and recognise_release(cfg.model.path):
        assert data["model"]["params"] > 1e9                 # the release's own size, not a DiT preset


def test_arch_flag_names_the_release_when_model_path_is_elsewhere(capsys):
    recipe = str(REPO_ROOT / "recipes" / "wan" / "wan2.1_1.3b_densedpo_lora.yaml")
    # 14B with LoRA on one 80 GB GPU at 480p is just over the usable 90% (exit 1: does not fit); the sizing is the point
    assert cli(["scale", recipe, "--json", "--arch", "wan2.1-t2v-14b", "--set", "model.path=/nowhere"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["name"] == "wan2.1-t2v-14b" and data["model"]["params"] == 14_288_491_584
    assert data["model"]["tokens"] == 21 * 30 * 52 and data["model"]["cond_tokens"] == 512


def test_an_unknown_model_path_is_one_error_naming_arch_and_a_single_gpu_recipe_is_sized_for_one_gpu(capsys):
    assert cli(["scale", str(REPO_ROOT / "recipes" / "wan" / "tiny_cpu.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist here and names no known release; pass --arch" in err and "Traceback" not in err
    # batch_size 1 on the default cluster (1 node x 8 GPUs) does not divide: the recipe is sized for one process.
    assert cli(["scale", str(REPO_ROOT / "recipes" / "wan" / "wan2.1_1.3b_densedpo_lora.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world"] == 1 and data["assumptions"][0].startswith("world 1: one process")
    assert data["activations_gib"]["checkpointing none"] > 10 * data["activations_gib"]["checkpointing full"]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if re.search(r"total \d+\.\d+ of \d+", (REPO_ROOT / r).read_text())])
def test_recipe_headers_quote_what_scale_prints(recipe):
    """A header's "total X of Y" (its first one: the recipe as it is) is the estimate's, so headers do not drift."""
    quoted = float(re.search(r"total (\d+\.\d+) of \d+", (REPO_ROOT / recipe).read_text()).group(1))
    cfg = load_config(str(REPO_ROOT / recipe))
    world = default_world(cfg)[0]
    assert round(estimate(cfg, world).total_gib, 2) == quoted


def test_cpu_offload_moves_the_sharded_state_to_host_memory():
    recipe = str(REPO_ROOT / "recipes" / "cogvideox" / "cogvideox5b_ipo_128gpu.yaml")
    on_gpu = estimate(load_config(recipe), 128)
    offloaded = estimate(load_config(recipe, ["parallel.cpu_offload=true"]), 128)
    moved = ("parameters", "lora", "gradients", "optimizer", "reference")
    assert not on_gpu.host_gib and all(offloaded.memory_gib[k] == 0.0 for k in moved)
    assert sum(offloaded.host_gib.values()) == pytest.approx(sum(on_gpu.memory_gib[k] for k in moved))
    assert offloaded.total_gib == pytest.approx(on_gpu.total_gib - sum(offloaded.host_gib.values()))
    assert offloaded.memory_gib["fsdp_buffers"] == on_gpu.memory_gib["fsdp_buffers"] > 0   # gathered units stay
    assert any("cpu offload" in a for a in offloaded.assumptions) and offloaded.as_dict()["host_gib"]
    # The copies and the host's AdamW are timed: H2D of the fp32 parameter shard per all-gather (forward, backward,
    # reference), D2H of the fp32 gradient shard, AdamW reading 4 and writing 3 fp32 values per trainable parameter.
    host = {r["collective"]: r for r in offloaded.comm if r["group"] == "host"}
    assert not [r for r in on_gpu.comm if r["group"] == "host"]
    gather = next(r for r in offloaded.comm if r["collective"] == "all-gather params")
    fsdp, ring = offloaded.layout["fsdp_group"], (offloaded.layout["fsdp_group"] - 1) / offloaded.layout["fsdp_group"]
    h2d = host["H2D parameter shards (offload)"]
    # the all-gather moves (g-1)/g of the bf16 unit; the copy is the fp32 shard, 1/g of it: ratio 2 / (g-1)
    assert h2d["GB"] == pytest.approx(gather["GB"] / ring / fsdp * 2)
    assert h2d["seconds"] == pytest.approx(h2d["GB"] / 25.0) and h2d["link"] == "PCIe"
    cfg = load_config(recipe, ["parallel.cpu_offload=true"])
    assert cfg.lora is None   # full fine-tuning: AdamW over the parameter shard, whose fp32 gradient goes D2H
    d2h = host["D2H gradient shards (offload)"]["GB"] / cfg.train.grad_accum
    assert host["AdamW on the CPU (offload)"]["GB"] == pytest.approx(d2h * 7 * offloaded.model["experts"])
    assert host["AdamW on the CPU (offload)"]["seconds"] == pytest.approx(host["AdamW on the CPU (offload)"]["GB"]
                                                                          / cfg.cluster.host_memory_gbytes_per_s)
    assert offloaded.comm_s == pytest.approx(on_gpu.comm_s + sum(r["seconds"] for r in host.values()))


def test_the_start_up_peak_counts_the_whole_model_and_its_frozen_copy():
    """parallel.init full: every rank loads the whole model on its GPU (and copies it for a frozen reference) before
    it is sliced and sharded: a full fp32 fine-tune of Wan 2.1 14B with a frozen reference needs 2 x 14.288 B x 4
    bytes at start-up, more than an 80 GiB GPU, whatever the sharded total says. parallel.init rank0 (the
    default): rank 0 holds one whole model in host memory, and no GPU more than its shards."""
    recipe = str(REPO_ROOT / "recipes" / "wan" / "wan2.1_14b_densedpo_128gpu.yaml")
    lora = estimate(load_config(recipe, ["parallel.init=full"]), 128)
    assert lora.model["reference_copies"] == 1
    assert lora.startup_gib == pytest.approx((lora.model["params"] + lora.model["lora_params"]) * 2 / 2**30)
    # the full fine-tuning the recipe's header weighs: fp32, frozen reference, tp 2 + sp, dp_shard -1, batch 64
    overrides = ["model.dtype=float32", "pref.reference=frozen_copy", "parallel.dp_shard=-1"]
    estimates = {}
    for init in ("full", "rank0"):
        cfg = load_config(recipe, overrides + [f"parallel.init={init}"])
        cfg.lora = None   # full fine-tuning (--set cannot remove a section), then TP, which LoRA refuses
        cfg.parallel.tp, cfg.parallel.sp, cfg.train.batch_size = 2, True, 64
        estimates[init] = estimate(cfg, 128)
    full = estimates["full"]
    assert full.model["reference_copies"] == 2
    assert full.startup_gib == pytest.approx(2 * full.model["params"] * 4 / 2**30)   # 106.4 GiB
    assert full.total_gib <= 0.9 * 80 and not full.fits                              # sharded, it would fit
    report = format_report(full)
    assert "its frozen reference copy on its GPU before slicing and sharding it: 106.4" in report
    assert "(DOES NOT FIT)" in report and full.as_dict()["startup_gib"] == full.startup_gib
    rank0 = estimates["rank0"]
    assert rank0.startup_gib == 0 and rank0.startup_host_gib == pytest.approx(full.model["params"] * 4 / 2**30)
    assert rank0.fits and rank0.total_gib == full.total_gib
    assert "rank 0 loads the whole model into host memory (53.2" in format_report(rank0)
