"""vidpo.models.lora: adapters on a toy model whose module names follow the video DiT's."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vidpo.config import LoRAConfig
from vidpo.models.lora import (
    DEFAULT_TARGET_MODULES,
    LoRALinear,
    apply_lora,
    settings_from_metadata,
    count_extra_parameter_bytes,
    load_lora,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    parameter_storage_bytes,
    save_lora,
    unload_lora,
    unmerge_lora,
)

WIDTH, CONTEXT, DEPTH = 12, 10, 2


class SelfAttention(nn.Module):
    def __init__(self, width, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    def __init__(self, width, context):
        super().__init__()
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context, 2 * width)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, ctx):
        k, v = self.kv(ctx).chunk(2, dim=-1)
        attn = torch.softmax(self.q(x) @ k.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.proj(attn @ v)


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, context):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = SelfAttention(width)
        self.cross = CrossAttention(width, context)
        self.mlp = MLP(width)

    def forward(self, x, ctx):
        x = x + self.attn(self.norm(x))
        x = x + self.cross(x, ctx)
        return x + self.mlp(x)


class ToyDiT(nn.Module):
    """Names like the DiT's: blocks.N.attn.qkv, blocks.N.cross.kv, blocks.N.mlp.fc1, plus untargeted
    embed/head linears."""

    def __init__(self, width=WIDTH, context=CONTEXT, depth=DEPTH):
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList(Block(width, context) for _ in range(depth))
        self.head = nn.Linear(width, 5)

    def forward(self, x, ctx):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, ctx)
        return self.head(h)


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ToyDiT().to(dtype)


def make_inputs(dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 7, 5, generator=gen, dtype=dtype),
            torch.randn(3, 4, CONTEXT, generator=gen, dtype=dtype))


def randomize_lora(model, seed=2, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(model):
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


EXPECTED_NAMES = [f"blocks.{i}.{name}" for i in range(DEPTH) for name in DEFAULT_TARGET_MODULES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_init_b_gives_base_output_bitwise(dtype):
    model = make_model(dtype)
    x, ctx = make_inputs(dtype)
    base_out = model(x, ctx)
    names = apply_lora(model, rank=4, alpha=8.0)
    assert sorted(names) == sorted(EXPECTED_NAMES)
    assert all(torch.count_nonzero(m.lora_A.weight) > 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model(x, ctx), base_out)


def test_untargeted_layers_stay_plain_linear_and_state_dict_keeps_base_keys():
    model = make_model()
    base_keys = set(model.state_dict())
    apply_lora(model)
    assert type(model.embed) is nn.Linear and type(model.head) is nn.Linear
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"{n}.{f}.weight" for n in EXPECTED_NAMES for f in ("lora_A", "lora_B")}


def test_lora_linear_matches_formula_and_gradcheck():
    torch.manual_seed(3)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, rank=3, alpha=5.0)
    randomize_lora(layer)
    x = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + (x @ a.T @ b.T) * (5.0 / 3)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda inp, pa, pb: F.linear(inp, base.weight, base.bias)
                                    + F.linear(F.linear(inp, pa), pb) * layer.scaling, (x, a, b))
    assert torch.autograd.gradcheck(layer, (x,))


def test_training_step_changes_output_only_through_lora():
    model = make_model()
    x, ctx = make_inputs()
    base_out = model(x, ctx).detach()
    apply_lora(model, rank=2)
    base_snapshot = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = mark_only_lora_trainable(model)
    assert trainable == sum(p.numel() for p in lora_parameters(model))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(model)}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = (model(x, ctx) - 1.0).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    optimizer.step()
    assert not torch.allclose(model(x, ctx), base_out)
    for key, value in model.state_dict().items():
        if key in base_snapshot:
            assert torch.equal(value, base_snapshot[key]), key
    with lora_disabled(model):
        assert torch.equal(model(x, ctx), base_out)


def test_lora_disabled_is_bitwise_base_and_restores_state_even_on_error():
    model = make_model(torch.float32)
    x, ctx = make_inputs(torch.float32)
    base_out = model(x, ctx)
    apply_lora(model)
    randomize_lora(model)
    lora_out = model(x, ctx)
    assert not torch.allclose(lora_out, base_out)
    with lora_disabled(model):
        assert torch.equal(model(x, ctx), base_out)
    assert torch.equal(model(x, ctx), lora_out)
    with pytest.raises(KeyError):
        with lora_disabled(model):
            raise KeyError("boom")
    assert all(m.enabled for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model(x, ctx), lora_out)
    # A layer switched off by hand before the block stays off after it.
    model.blocks[0].attn.qkv.enabled = False
    with lora_disabled(model):
        pass
    assert model.blocks[0].attn.qkv.enabled is False and model.blocks[1].attn.qkv.enabled is True


def test_merge_equals_unmerged_and_unmerge_restores():
    model = make_model()
    x, ctx = make_inputs()
    apply_lora(model, rank=3, alpha=7.0)
    randomize_lora(model)
    unmerged_out = model(x, ctx)
    weights = {n: (m.weight.clone(), m.weight.data_ptr()) for n, m in model.named_modules()
               if isinstance(m, LoRALinear)}
    assert merge_lora(model) == len(EXPECTED_NAMES)
    assert merge_lora(model) == 0
    torch.testing.assert_close(model(x, ctx), unmerged_out, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with lora_disabled(model):
            pass
    # An explicitly merged copy of the base model gives the same function.
    assert unmerge_lora(model) == len(EXPECTED_NAMES)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            torch.testing.assert_close(module.weight, weights[name][0], rtol=0, atol=1e-12)
            assert module.weight.data_ptr() == weights[name][1]
    torch.testing.assert_close(model(x, ctx), unmerged_out, rtol=0, atol=1e-12)


def test_unload_lora_gives_plain_model_with_merged_weights():
    model = make_model()
    x, ctx = make_inputs()
    base_keys = set(model.state_dict())
    apply_lora(model)
    randomize_lora(model)
    lora_out = model(x, ctx)
    assert sorted(unload_lora(model)) == sorted(EXPECTED_NAMES)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == base_keys
    torch.testing.assert_close(model(x, ctx), lora_out, rtol=0, atol=1e-12)


def test_reference_costs_zero_extra_parameter_memory():
    model = make_model(torch.float32)
    before_bytes = parameter_storage_bytes(model)
    base_params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    apply_lora(model, rank=4)
    after = dict(model.named_parameters())
    for name, (param, ptr) in base_params.items():
        assert after[name] is param and after[name].data_ptr() == ptr, name
    expected = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            expected += 4 * (module.in_features + module.out_features) * 4
    assert count_extra_parameter_bytes(model) == expected
    assert parameter_storage_bytes(model) - before_bytes == expected


def test_shared_linear_gets_one_adapter():
    model = make_model()
    model.blocks[1].mlp.fc2 = model.blocks[0].mlp.fc2
    names = apply_lora(model, target_modules=["mlp.fc2"])
    assert names == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert model.blocks[0].mlp.fc2 is model.blocks[1].mlp.fc2
    assert len(lora_parameters(model)) == 2


def test_pattern_matching_and_errors():
    model = make_model()
    # 'kv' ends 'cross.kv' on a dot boundary but not 'attn.qkv'.
    assert apply_lora(model, target_modules=["kv"]) == ["blocks.0.cross.kv", "blocks.1.cross.kv"]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, target_modules=["kv"])
    with pytest.raises(ValueError, match=r"to_q.*to_out\.0.*blocks\.0\.attn\.qkv"):
        apply_lora(make_model(), target_modules=["to_q", "to_out.0"])
    with pytest.raises(TypeError, match="'attn' matched 'blocks.0.attn', a SelfAttention"):
        apply_lora(make_model(), target_modules=["attn"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        mark_only_lora_trainable(make_model())
    for bad in (dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(init_lora_weights="kaiming"),
                dict(target_modules=[])):
        with pytest.raises(ValueError, match="LoRAConfig"):
            LoRAConfig(**bad)


@pytest.mark.parametrize("prefix_style,prefix", [("peft", "base_model.model."), ("diffusers", "transformer."),
                                                 ("none", "")])
def test_save_load_round_trip(tmp_path, prefix_style, prefix):
    model = make_model()
    x, ctx = make_inputs()
    apply_lora(model, rank=3, alpha=6.0, target_modules=["attn.qkv", "mlp.fc1", "cross.kv"])
    randomize_lora(model)
    lora_out = model(x, ctx)
    path = tmp_path / "out" / "adapter.safetensors"
    save_lora(model, path, prefix_style=prefix_style)
    assert os.listdir(path.parent) == ["adapter.safetensors"]  # no temporary left behind
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == set(lora_state_dict(model, prefix_style))
    assert f"{prefix}blocks.1.attn.qkv.lora_A.weight" in keys and f"{prefix}blocks.0.cross.kv.lora_B.weight" in keys
    assert metadata["rank"] == "3" and float(metadata["alpha"]) == 6.0
    assert json.loads(metadata["target_modules"]) == ["attn.qkv", "cross.kv", "mlp.fc1"]
    adapter_meta = json.loads(metadata["lora_adapter_metadata"])
    assert adapter_meta[("transformer." if prefix_style == "diffusers" else "") + "r"] == 3

    fresh = make_model()  # same base weights, no adapters: load_lora creates them from the metadata
    loaded = load_lora(fresh, path)
    assert len(loaded) == 3 * DEPTH
    torch.testing.assert_close(fresh(x, ctx), lora_out, rtol=0, atol=0)

    adapted = make_model()
    apply_lora(adapted, rank=3, alpha=6.0, target_modules=["attn.qkv", "mlp.fc1", "cross.kv"])
    merge_lora(adapted)
    load_lora(adapted, path)  # a merged model is re-merged with the loaded factors
    torch.testing.assert_close(adapted(x, ctx), lora_out, rtol=0, atol=1e-12)


def test_load_errors_and_peft_adapter_name_infix(tmp_path):
    model = make_model()
    apply_lora(model, rank=2, target_modules=["mlp.fc1"])
    randomize_lora(model)
    path = tmp_path / "a.safetensors"
    save_lora(model, path)

    wider = make_model()
    apply_lora(wider, rank=2, target_modules=["mlp.fc1", "mlp.fc2"])
    with pytest.raises(ValueError, match=r"missing \['blocks.0.mlp.fc2.lora_A.weight'"):
        load_lora(wider, path)
    assert len(load_lora(wider, path, strict=False)) == 2 * DEPTH
    wrong_rank = make_model()
    apply_lora(wrong_rank, rank=5, target_modules=["mlp.fc1"])
    with pytest.raises(ValueError, match="has shape"):
        load_lora(wrong_rank, path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(make_model(), tmp_path / "missing.safetensors")

    # A peft checkpoint as peft's model.state_dict() names it ('lora_A.default.weight'), no metadata.
    peft_file = tmp_path / "peft.safetensors"
    state = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v.clone()
             for k, v in lora_state_dict(model, "peft").items()}
    save_file(state, str(peft_file))
    with pytest.raises(ValueError, match="no LoRA metadata"):
        load_lora(make_model(), peft_file)
    target = make_model()
    apply_lora(target, rank=2, target_modules=["mlp.fc1"])
    load_lora(target, peft_file)
    for (_, a), (_, b) in zip(sorted(lora_state_dict(target).items()), sorted(lora_state_dict(model).items())):
        assert torch.equal(a, b)


def test_dropout_only_touches_the_adapter_branch():
    model = make_model()
    x, ctx = make_inputs()
    base_out = model(x, ctx)
    apply_lora(model, dropout=0.5)
    randomize_lora(model)
    model.train()
    torch.manual_seed(0)
    first = model(x, ctx)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x, ctx))
    with lora_disabled(model):
        assert torch.equal(model(x, ctx), base_out)
    model.eval()
    assert torch.equal(model(x, ctx), model(x, ctx))


def test_config_from_diffusers_only_metadata():
    blob = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.target_modules": ["to_q", "to_v"]}
    settings = settings_from_metadata({"lora_adapter_metadata": json.dumps(blob)})
    assert (settings["rank"], settings["alpha"], settings["target_modules"]) == (4, 4.0, ["to_q", "to_v"])
    with pytest.raises(ValueError, match="x.safetensors: unreadable LoRA metadata"):
        settings_from_metadata({"rank": "four", "alpha": "1"}, "x.safetensors")
