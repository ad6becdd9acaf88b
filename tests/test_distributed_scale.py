"""``vidpo scale``: the per-GPU memory / communication estimate of a layout, on paper.

The activation constants are checked against what the single-device DiT really saves for backward
(saved_tensors_hooks on CPU), the tensor-parallel parameter split against the parallelize plan, and the
layout arithmetic against hand-computed values; the cluster recipes must fit their GPUs."""
import json

import pytest
import torch

from vidpo.cli import main as cli
from vidpo.cluster.scale import GIB, OUTSIDE_BLOCKS, activation_elements_per_token_block, estimate, tp_split_params
from vidpo.config import REPO_ROOT, load_config
from vidpo.models.dit import build_dit, dit_config
from vidpo.models.dit.parallelize import tp_plan

WAN = str(REPO_ROOT / "recipes" / "cluster" / "dit1.3b_densedpo_128gpu.yaml")
IPO = str(REPO_ROOT / "recipes" / "cluster" / "dit5b_ipo_round.yaml")


def saved_elements_per_token(depth: int, width: int) -> float:
    """Elements the DiT saves for backward per token (params excluded), one forward, fp32, CPU."""
    cfg = dit_config("tiny", width=width, depth=depth, num_heads=4, cond_vocab_size=10, patch_size=(1, 2, 2))
    model = build_dit(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 3, 4, 16, 16, generator=g), torch.rand(2, generator=g), torch.randint(0, 10, (2, 5))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, cond)
    return sum(storages.values()) / 4 / (2 * cfg.num_tokens(4, 16, 16)), cfg


@pytest.mark.parametrize("width", [64, 96])
def test_activation_constants_match_what_the_model_saves(width):
    one, cfg = saved_elements_per_token(1, width)
    two, _ = saved_elements_per_token(2, width)
    per_block = two - one
    assert per_block == pytest.approx(activation_elements_per_token_block(width, cfg.resolved_ffn_dim), rel=0.05)
    assert one - per_block == pytest.approx(OUTSIDE_BLOCKS * width, rel=0.25)


def test_tp_split_matches_the_parallelize_plan():
    cfg = dit_config("tiny", width=48, depth=3, num_heads=4, cond_vocab_size=10, ffn_dim=80)
    model = build_dit(cfg, device="meta")
    params = dict(model.named_parameters())
    assert tp_split_params(cfg) == sum(params[name].numel() for name in tp_plan(model))


def states(est) -> float:
    return sum(est.memory_gib[k] for k in ("parameters", "gradients", "optimizer"))


def test_layout_arithmetic():
    base = ["model.preset=1.3b", "world.frames=8", "world.height=64", "world.width=64", "train.objective=dense_dpo",
            "train.batch_size=16", "cluster.gpus_per_node=8"]
    plain = estimate(load_config(None, base), 16)
    params = plain.model["params"]
    # FSDP over 16 ranks: 16 B per parameter / 16 (fp32 weights, gradients, AdamW m and v); the frozen reference 4 B / 16.
    assert states(plain) * GIB == pytest.approx(params, rel=1e-9)
    assert plain.memory_gib["reference"] * GIB == pytest.approx(params / 4, rel=1e-9)
    assert [r["collective"] for r in plain.comm] == ["all-gather params", "reduce-scatter grads"]
    assert all(r["link"] == "inter-node" for r in plain.comm)          # 16 ranks span 2 nodes of 8

    tp = estimate(load_config(None, base + ["parallel.tp=2"]), 16)
    sp = estimate(load_config(None, base + ["parallel.tp=2", "parallel.sp=true"]), 16)
    ac = estimate(load_config(None, base + ["parallel.tp=2", "parallel.sp=true",
                                            "parallel.activation_checkpointing=full"]), 16)
    d, f = 1536, 8960
    # Same pairs per GPU pair: TP halves the TP region per GPU, SP the rest too; both with 2x the videos/GPU.
    assert tp.memory_gib["activations"] / plain.memory_gib["activations"] == pytest.approx(
        2 * (10 * d + (13.5 * d + 2 * f) / 2 + 4 * d / 30) / (23.5 * d + 2 * f + 4 * d / 30), rel=1e-6)
    assert sp.memory_gib["activations"] < tp.memory_gib["activations"] < 2 * plain.memory_gib["activations"]
    assert ac.memory_gib["activations"] < sp.memory_gib["activations"] / 5
    assert {r["group"] for r in sp.comm} == {"tp", "dp_shard x cp"}
    assert all(r["link"] == "intra-node" for r in sp.comm if r["group"] == "tp")

    hsdp = estimate(load_config(None, base + ["parallel.dp_shard=8"]), 16)
    assert states(hsdp) == pytest.approx(2 * states(plain))
    links = {r["collective"]: r["link"] for r in hsdp.comm}
    assert links == {"all-gather params": "intra-node", "reduce-scatter grads": "intra-node",
                     "all-reduce grad shards": "inter-node"}
    cp = estimate(load_config(None, base + ["parallel.cp=2"]), 16)
    assert any(r["collective"] == "all-to-all (Ulysses)" for r in cp.comm)
    with pytest.raises(Exception, match="not divisible"):
        estimate(load_config(None, base + ["parallel.cp=3"]), 16)


def test_cluster_recipes_fit_and_checkpointing_is_what_makes_them_fit(capsys):
    for recipe in (WAN, IPO):
        assert cli(["scale", recipe]) == 0
        report = capsys.readouterr().out
        assert "(fits; 10% kept free)" in report and "| activations |" in report
        assert cli(["scale", recipe, "--set", "parallel.activation_checkpointing=none"]) == 1
        assert "DOES NOT FIT" in capsys.readouterr().out
    assert cli(["scale", WAN, "--json", "--world", "64", "--set", "train.batch_size=32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world"] == 64 and data["layout"]["dp"] == 32 and data["fits"] is True
    assert data["model"]["tokens"] == 75600 and data["model"]["videos_per_gpu"] == 2
