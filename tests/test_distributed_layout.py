"""Single-process pieces of the distributed engine: the parallel DiT's sequence-first forward without any
group (float64, against VideoDiT), the tensor-parallel split of fused projections, and layout arithmetic."""
import pytest
import torch

from helpers.tolerances import FLOAT64_REARRANGED, assert_close
from vidpo.config import ParallelConfig
from vidpo.training.distributed import DistributedSetupError, init_distributed, resolve_layout, weighted_means
from vidpo.models.dit import build_dit, dit_config
from vidpo.models.dit.parallelize import ParallelVideoDiT, ShardSpec, TPShard, tp_plan


def micro_dit():
    torch.manual_seed(0)
    model = build_dit(dit_config("tiny", width=48, depth=2, num_heads=4, cond_vocab_size=10, ffn_dim=72,
                                 patch_size=(1, 2, 2))).double()
    with torch.no_grad():  # adaLN-zero starts every block as the identity: make them do something
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_sequence_first_forward_equals_video_dit(checkpointing):
    """With no group the parallel model is the single-device model in another layout: same output and
    gradients (float64)."""
    reference = micro_dit()
    parallel = ParallelVideoDiT(micro_dit(), ShardSpec(), activation_checkpointing=checkpointing)
    assert [n for n, _ in parallel.named_parameters()] == [n for n, _ in reference.named_parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 6, generator=g, dtype=torch.float64)
    t, cond = torch.rand(2, generator=g, dtype=torch.float64), torch.randint(0, 10, (2, 3), generator=g)
    weight = torch.randn(2, 3, 4, 8, 6, generator=g, dtype=torch.float64)
    outs = []
    for model in (reference, parallel):
        v = model(x, t, cond)
        (v * weight).sum().backward()
        outs.append(v.detach())
    assert_close(outs[1], outs[0], FLOAT64_REARRANGED)
    for (name, p), q in zip(reference.named_parameters(), parallel.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert parallel.local_frames(4) == slice(0, 4)


def test_fused_qkv_shards_hold_whole_heads():
    """Rank r's shard of attn.qkv is [q_r; k_r; v_r]: the rows of heads r*h/tp .. (r+1)*h/tp of each part."""
    width, heads, head_dim, tp = 12, 4, 3, 2
    full = torch.arange(3 * width * 5, dtype=torch.float64).view(3 * width, 5)
    spec = TPShard(0, 3)
    shards = [spec.shard(full, r, tp) for r in range(tp)]
    per_rank = heads // tp * head_dim
    for r, shard in enumerate(shards):
        for part in range(3):
            rows = full[part * width + r * per_rank: part * width + (r + 1) * per_rank]
            assert torch.equal(shard[part * per_rank:(part + 1) * per_rank], rows)
    assert torch.equal(spec.unshard(shards), full)
    # The checkpoint view makes the same shard a contiguous block along dim 1.
    assert torch.equal(spec.checkpoint_view(full).chunk(tp, dim=1)[1], spec.checkpoint_view(shards[1]))
    row = TPShard(1)
    assert torch.equal(row.unshard([row.shard(full, r, 3) for r in range(3)]), full)


def test_tp_plan_names_every_split_parameter():
    plan = tp_plan(micro_dit())
    assert plan["blocks.0.attn.qkv.weight"] == TPShard(0, 3) and plan["blocks.0.attn.qkv.bias"] == TPShard(0, 3)
    assert plan["blocks.1.cross.kv.weight"] == TPShard(0, 2) and plan["blocks.1.cross.q.bias"] == TPShard(0, 1)
    assert plan["blocks.0.mlp.fc2.weight"] == TPShard(1) and "blocks.0.mlp.fc2.bias" not in plan
    assert not any(name.startswith(("patch_embed", "final", "adaLN", "time_embed")) for name in plan)
    assert len(plan) == 2 * (4 * 2 + 3)  # per block: qkv, q, kv, fc1 (weight + bias) + proj, cross.proj, fc2


def test_layout_arithmetic_and_errors():
    layout = resolve_layout(16, ParallelConfig(tp=2, cp=2, dp_shard=2), num_heads=8, frames=4)
    assert (layout.dp, layout.dp_shard, layout.dp_replicate, layout.fsdp_size) == (4, 2, 2, 4)
    assert resolve_layout(8, ParallelConfig()).dp_shard == 8
    assert not resolve_layout(8, ParallelConfig(dp_shard=1)).fsdp
    assert not resolve_layout(4, ParallelConfig(sp=True)).sp   # sp without tp is ignored (with a warning)
    for parallel, kwargs, message in [
            (ParallelConfig(tp=3), {}, "world size 8 is not divisible by parallel.tp \\* parallel.cp = 3"),
            (ParallelConfig(dp_shard=3), {}, "parallel.dp_shard=3 must divide the data-parallel size 8"),
            (ParallelConfig(tp=2, cp=2), {"num_heads": 6}, "6 attention heads are not divisible"),
            (ParallelConfig(cp=4), {"frames": 6}, "6 latent frames .* not divisible by parallel.cp = 4")]:
        with pytest.raises(DistributedSetupError, match=message):
            resolve_layout(8, parallel, **kwargs)


def test_single_process_needs_no_groups(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(ParallelConfig(dp_shard=4)) is None
    with pytest.raises(DistributedSetupError, match="torchrun --nproc-per-node 2"):
        init_distributed(ParallelConfig(tp=2))
    assert weighted_means({"a": (2.0, 3.0), "b": (5.0, 0.0)}, None) == {"a": 2.0, "b": 0.0}
