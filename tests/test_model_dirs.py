"""Model directories as released (tiny random Wan 2.1, Wan 2.2 A14B / TI2V-5B and CogVideoX pipelines written by the
pipelines' own ``save_pretrained``, ``helpers.pipelines``): each opens and its parts load; the adapter's forward is
the diffusers transformer's; the engine's sampler with the release's scheduler equals the pipeline's ``__call__`` on
the same noise; the exported LoRA loads into the diffusers pipeline with every adapter and samples as the engine's
merged policy; the VAE decodes what diffusers decodes; bad directories are one clear error."""
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from helpers.models import add_random_lora  # noqa: E402
from helpers.pipelines import (FRAMES, SIZE, TEXT_DIM, TEXT_TOKENS, diffusers_pipeline, make_cogvideox_dir,  # noqa: E402
                               make_wan_dir, pipeline_latents, pixel_frames)

from vidpo.models.adapters import ATTENTION_LORA_TARGETS, export_lora_file, export_lora_state  # noqa: E402
from vidpo.models.lora import lora_disabled, lora_modules, lora_state_dict, merge_lora  # noqa: E402
from vidpo.models.pipeline_dir import ModelDirectoryError, PipelineDirectory  # noqa: E402
from vidpo.models.registry import MODELS, load_adapter, open_pipeline  # noqa: E402
from vidpo.models.vae import DiffusersVAE, vae_geometry  # noqa: E402
from vidpo.models.wan import WanAdapter, make_tiny_wan_dir  # noqa: E402
from vidpo.utils.seeding import generator, randn_per_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red square moving left", "the blue circle moving up quickly"]
# name -> (kind, builder kwargs, latent shape (C, T, H, W) of a clip of 32 x 32 frames)
RELEASES = {
    "wan2.1": ("wan", dict(), (16, 3, 4, 4)),
    "wan2.2-a14b": ("wan", dict(two_experts=True), (16, 3, 4, 4)),
    "wan2.2-ti2v": ("wan", dict(ti2v=True), (48, 3, 2, 2)),
    "cogvideox-2b": ("cogvideox", dict(layout="2b"), (16, 3, 4, 4)),
    "cogvideox-5b": ("cogvideox", dict(layout="5b"), (16, 3, 4, 4)),
    "cogvideox-1.5": ("cogvideox", dict(layout="1.5"), (16, 4, 4, 4)),   # 2-frame temporal patches: 13 frames
}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    dirs = {}
    for name, (kind, kwargs, _) in RELEASES.items():
        build = make_wan_dir if kind == "wan" else make_cogvideox_dir
        dirs[name] = build(root / name, prompts=PROMPTS, **kwargs)
    return dirs


# ----- opening a release and loading its parts ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RELEASES))
def test_release_opens_and_its_parts_load(releases, name):
    kind, kwargs, latent = RELEASES[name]
    pipe = open_pipeline(kind, releases[name], require=("vae", "text_encoder", "tokenizer", "scheduler"))
    assert pipe.experts == (("transformer", "transformer_2") if kwargs.get("two_experts") else ("transformer",))
    assert pipe.boundary_ratio == (0.875 if kwargs.get("two_experts") else None)
    assert pipe.expand_timesteps is bool(kwargs.get("ti2v"))
    assert pipe.text_max_length == MODELS[kind].text_max_length

    vae = pipe.vae()
    assert vae.latent_shape(pixel_frames(latent[1]), SIZE, SIZE) == latent
    assert vae.class_name == ("AutoencoderKLWan" if kind == "wan" else "AutoencoderKLCogVideoX")

    # the text encoder in the pipeline's own convention: Wan masks and zeroes the padding, CogVideoX keeps it
    text = pipe.text_encoder(max_length=TEXT_TOKENS)
    emb, mask = text.encode(PROMPTS)
    assert emb.shape == (2, TEXT_TOKENS, TEXT_DIM) and mask.sum(1).tolist() == [6, 7]
    reference = diffusers_pipeline(releases[name])
    with torch.no_grad():
        want = reference.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS,
                                       device=torch.device("cpu"))[0]
    torch.testing.assert_close(emb, want.float(), rtol=1e-6, atol=1e-6)
    assert (emb[0, 6:] == 0).all() == (kind == "wan")
    if name == "cogvideox-2b":      # sincos positions: the text length is fixed by the transformer
        assert pipe.text_encoder().max_length == TEXT_TOKENS
        with pytest.raises(ModelDirectoryError, match="exactly 8 text tokens"):
            pipe.text_encoder(max_length=16)

    # the adapter: transformer(s) in the asked dtype, the release's scheduler as its default sampler
    model = load_adapter(kind, releases[name], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    kept = model.transformer._keep_in_fp32_modules or []    # diffusers keeps Wan's norms / time embedder in fp32
    assert all(p.dtype == torch.bfloat16 or any(k in n for k in kept) for n, p in model.named_parameters())
    assert len(model.experts()) == len(pipe.experts)
    assert model.sampler_name == ("unipc" if kind == "wan" else "ddim")
    if kind == "wan":
        assert model.sample_shift == 3.0 and model.boundary_ratio == pipe.boundary_ratio


def test_release_vae_geometry_from_the_released_configs(tmp_path):
    """The geometry comes from the architecture: the real releases' VAE configs (no weights needed)."""
    wan21 = {"_class_name": "AutoencoderKLWan", "base_dim": 96, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
             "temperal_downsample": [False, True, True], "z_dim": 16, "latents_mean": [0.0] * 16,
             "latents_std": [1.0] * 16}     # Wan 2.1's config.json has no scale_factor_* keys
    wan22 = {**wan21, "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "patch_size": 2,
             "in_channels": 12, "out_channels": 12, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
             "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}
    cog = {"_class_name": "AutoencoderKLCogVideoX", "block_out_channels": [128, 256, 256, 512], "latent_channels": 16,
           "temporal_compression_ratio": 4, "scaling_factor": 1.15258426}
    for name, config, (channels, temporal, spatial) in (("wan21", wan21, (16, 4, 8)), ("wan22", wan22, (48, 4, 16)),
                                                        ("cog", cog, (16, 4, 8))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        g = vae_geometry(tmp_path / name)
        assert (g.latent_channels, g.temporal_compression, g.spatial_compression) == (channels, temporal, spatial)
    assert vae_geometry(tmp_path / "cog").norm == {"kind": "scale", "scale": 1.15258426}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**wan21, "scale_factor_spatial": 16}))
    with pytest.raises(ValueError, match="scale_factor_spatial=16.*compresses 8x"):
        vae_geometry(tmp_path / "bad")


@pytest.mark.parametrize("name", ["wan2.1", "wan2.2-ti2v", "cogvideox-2b"])
def test_vae_round_trip_matches_diffusers_decode(releases, name):
    """encode -> normalised latents of the VAE's latent shape; decode(encode(x)) is diffusers' ``vae.decode`` of the
    raw posterior mean (float64), i.e. decode undoes exactly what encode normalised."""
    kind, _, latent = RELEASES[name]
    vae = DiffusersVAE(releases[name] / "vae", "cpu", torch.float64, slicing=True)
    x = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    z = vae.encode(x)
    assert z.dtype == torch.float32 and z.shape == (2, *latent)
    with torch.no_grad():
        raw = vae.vae.encode(x).latent_dist.mean
        want = vae.vae.decode(raw).sample.clamp(-1, 1)
    if kind == "wan":
        cfg = vae.vae.config
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(z.double(), (raw - mean) / std, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(z.double(), raw * vae.vae.config.scaling_factor, rtol=1e-6, atol=1e-6)
    vae64 = DiffusersVAE(releases[name] / "vae", "cpu", torch.float64)
    out = vae64.decode(vae64.normalize(raw))                        # the normalisation inverted in float64 ...
    assert out.dtype == torch.float32 and out.shape == x.shape and out.abs().max() <= 1
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vae.decode(z).double(), want, rtol=1e-4, atol=1e-5)   # ... and via float32 latents
    with pytest.raises(ValueError, match="frames"):
        vae.encode(x[:, :, :8])


# ----- the adapter's forward is the diffusers transformer's ------------------------------------------------------
@pytest.mark.parametrize("name", list(RELEASES))
def test_adapter_forward_equals_the_diffusers_transformer(releases, name):
    kind, kwargs, latent = RELEASES[name]
    model = load_adapter(kind, releases[name])
    pipe = diffusers_pipeline(releases[name])
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, *latent, generator=g), torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g)
    t = torch.tensor([0.95, 0.3])          # one row on each side of Wan 2.2's boundary (0.875)
    with torch.no_grad():
        got = model(x, t, emb)
        if kind == "wan":
            experts = [pipe.transformer, pipe.transformer_2 if kwargs.get("two_experts") else pipe.transformer]
            rows = []
            for k, expert in enumerate(experts):
                timestep = t[k:k + 1] * 1000
                if kwargs.get("ti2v"):     # WanPipeline's expand_timesteps: one timestep per latent token
                    timestep = timestep.expand(1, latent[1] * (latent[2] // 2) * (latent[3] // 2))
                rows.append(expert(hidden_states=x[k:k + 1], timestep=timestep, encoder_hidden_states=emb[k:k + 1],
                                   return_dict=False)[0])
            want = torch.cat(rows)
        else:
            rope = (pipe._prepare_rotary_positional_embeddings(SIZE, SIZE, latent[1], torch.device("cpu"))
                    if pipe.transformer.config.use_rotary_positional_embeddings else None)
            want = pipe.transformer(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=emb,
                                    timestep=torch.round(t * 999).long(), image_rotary_emb=rope,
                                    return_dict=False)[0].permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(got, want, **TOL)
    if kwargs.get("two_experts"):   # the rows really went to different experts
        with torch.no_grad():
            other = pipe.transformer(hidden_states=x[1:], timestep=t[1:] * 1000, encoder_hidden_states=emb[1:],
                                     return_dict=False)[0]
        assert (other - got[1:]).abs().max() > 1e-3
        assert model.high_noise(torch.tensor([0.875, 0.8749])).tolist() == [True, False]
        assert model.timestep_ranges() == {"transformer": (0.875, 1.0), "transformer_2": (0.0, 0.875)}


# ----- sampling equals the pipeline's __call__ -----------------------------------------------------------------
@pytest.mark.parametrize("name,steps,extra", [
    ("wan2.1", 4, {}), ("wan2.2-a14b", 6, {}), ("wan2.2-a14b", 6, {"cfg_scale_2": 2.5}), ("wan2.2-ti2v", 4, {}),
    ("cogvideox-2b", 4, {}), ("cogvideox-5b", 4, {}), ("cogvideox-1.5", 4, {})])
def test_engine_sampler_equals_the_pipeline_call(releases, name, steps, extra):
    kind, kwargs, latent = RELEASES[name]
    model = load_adapter(kind, releases[name])
    pipe = diffusers_pipeline(releases[name])
    g = torch.Generator().manual_seed(2)
    cond, neg = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g)
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [expert.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, expert in model.experts()]
    got = model.sample(cond, latent, seed=3, indices=[1, 5], steps=steps, cfg_scale=4.0, null_cond=neg, **extra)
    for hook in hooks:
        hook.remove()
    noise = randn_per_sample((2, *latent), 3, [1, 5], "sample")
    pipe_extra = {"guidance_scale_2": extra["cfg_scale_2"]} if "cfg_scale_2" in extra else {}
    want = pipeline_latents(pipe, noise, cond, neg, steps, 4.0, **pipe_extra)
    torch.testing.assert_close(got, want, **TOL)
    assert got.abs().max() > 0.5
    if kwargs.get("two_experts"):   # 6 steps at shift 3: sigma 1, 0.94 on the high-noise expert, the rest on the low
        assert calls == {"transformer": 2, "transformer_2": 4}
        if extra:
            assert (got - model.sample(cond, latent, seed=3, indices=[1, 5], steps=steps, cfg_scale=4.0,
                                       null_cond=neg)).abs().max() > 1e-3


def test_cogvideox_dpm_sampler_runs_the_pipelines_dpm_loop(releases):
    """With CogVideoXDPMScheduler the loop is the pipeline's, only the per-step noise differs in layout: the engine
    draws row k's step noise from its own stream in (C, T, H, W), CogVideoXPipeline in (T, C, H, W). With step
    noise switched off (eta irrelevant: the SDE noise enters through the generator), one step is deterministic."""
    from diffusers import CogVideoXDPMScheduler

    model = load_adapter("cogvideox", releases["cogvideox-5b"], sampler="dpm")
    pipe = diffusers_pipeline(releases["cogvideox-5b"])
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    latent = RELEASES["cogvideox-5b"][2]
    g = torch.Generator().manual_seed(4)
    cond, neg = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g)
    got = model.sample(cond, latent, seed=3, indices=[1, 5], steps=1, cfg_scale=4.0, null_cond=neg)
    noise = randn_per_sample((2, *latent), 3, [1, 5], "sample")
    gens = [generator(3, "sample", "steps", i) for i in (1, 5)]
    want = pipeline_latents(pipe, noise, cond, neg, 1, 4.0, generator=gens)
    torch.testing.assert_close(got, want, **TOL)      # a 1-step DPM run ends on x0_pred: no step noise


# ----- LoRA: export, load into diffusers with every adapter, same samples --------------------------------------
@pytest.mark.parametrize("name", ["wan2.1", "wan2.2-a14b", "cogvideox-2b"])
def test_exported_lora_loads_every_adapter_and_samples_as_the_merged_policy(releases, name, tmp_path):
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    kind, kwargs, latent = RELEASES[name]
    model = load_adapter(kind, releases[name])
    ffn = "ffn.net.2" if kind == "wan" else "ff.net.2"
    add_random_lora(model, rank=2, alpha=3.0, target_modules=[*ATTENTION_LORA_TARGETS, ffn], seed=5, std=0.1)
    odd = next(m for _, m in lora_modules(model))        # one module with its own alpha (an alpha_pattern entry)
    odd.alpha, odd.scaling = 5.0, 5.0 / odd.rank
    per_expert = {n: len(list(lora_modules(e))) for n, e in model.experts()}
    assert all(count > 0 for count in per_expert.values())

    # the FSDP run's checkpoint keys (base_model.model.transformer[_2].*) re-export to the same files
    fsdp_keys = {f"base_model.model.{k}": v for k, v in model.state_dict().items() if ".lora_" in k}
    out = model.export_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "lora" / "transformer_2").is_dir() == bool(kwargs.get("two_experts"))
    if kind == "cogvideox":
        export_lora_state(fsdp_keys, tmp_path / "fsdp", alpha=3.0)
        from safetensors.torch import load_file

        a, b = (load_file(str(p / "pytorch_lora_weights.safetensors")) for p in (tmp_path / "lora", tmp_path / "fsdp"))
        assert a.keys() == b.keys() and all(k.startswith("transformer.transformer_blocks.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)

    pipe = diffusers_pipeline(releases[name])
    pipe.load_lora_weights(out)
    loaded = {"transformer": sum(isinstance(m, LoraLayer) for m in pipe.transformer.modules())}
    if kwargs.get("two_experts"):
        pipe.load_lora_weights(tmp_path / "lora" / "transformer_2", load_into_transformer_2=True)
        loaded["transformer_2"] = sum(isinstance(m, LoraLayer) for m in pipe.transformer_2.modules())
    assert loaded == per_expert

    g = torch.Generator().manual_seed(6)
    cond, neg = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    with lora_disabled(model):
        base = model.sample(cond, latent, seed=7, indices=[0], steps=6, cfg_scale=4.0, null_cond=neg)
    merge_lora(model)
    merged = model.sample(cond, latent, seed=7, indices=[0], steps=6, cfg_scale=4.0, null_cond=neg)
    want = pipeline_latents(pipe, randn_per_sample((1, *latent), 7, [0], "sample"), cond, neg, 6, 4.0)
    assert (merged - base).abs().max() > 1e-3          # the adapters matter
    torch.testing.assert_close(merged, want, **TOL)


def test_lora_file_forms_and_reexport_of_a_multi_process_checkpoint(releases, tmp_path):
    """The single-file form (what a run writes as lora.safetensors) and the re-export of a multi-process run's file
    (keys base_model.model.transformer[_2].*, vidpo metadata) give the same tensors as the directory form."""
    from safetensors.torch import load_file

    from vidpo.utils import atomic

    model = load_adapter("wan", releases["wan2.2-a14b"])
    add_random_lora(model, rank=2, alpha=3.0, target_modules=list(ATTENTION_LORA_TARGETS), seed=8)
    model.export_lora(tmp_path / "dir")
    model.export_lora(tmp_path / "lora.safetensors")
    atomic.save_safetensors(lora_state_dict(model), tmp_path / "ckpt.safetensors",   # peft-style, as DCP writes
                            metadata={"rank": "2", "alpha": "3.0", "target_modules": json.dumps(["to_q"])})
    export_lora_file(tmp_path / "ckpt.safetensors", tmp_path / "reexport")
    for part, single in (("", "lora.safetensors"), ("transformer_2/", "lora.transformer_2.safetensors")):
        want = load_file(str(tmp_path / "dir" / part / "pytorch_lora_weights.safetensors"))
        assert len(want) == 2 * 8 and all(k.startswith("transformer.blocks.") for k in want)
        for other in (tmp_path / single, tmp_path / "reexport" / part / "pytorch_lora_weights.safetensors"):
            got = load_file(str(other))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ----- gradient checkpointing --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wan2.2-a14b", "cogvideox-5b"])
def test_gradient_checkpointing_gives_the_same_gradients(releases, name):
    kind, _, latent = RELEASES[name]
    g = torch.Generator().manual_seed(9)
    x, emb = torch.randn(2, *latent, generator=g), torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g)
    t, target = torch.tensor([0.95, 0.3]), torch.randn(2, *latent, generator=g)
    model = load_adapter(kind, releases[name]).train()
    add_random_lora(model, rank=2, alpha=2.0, target_modules=list(ATTENTION_LORA_TARGETS), seed=10)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert all(e.gradient_checkpointing for _, e in model.experts())
        model.zero_grad(set_to_none=True)
        ((model(x, t, emb) - target) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("transformer_2.") for n in grads[0]) == (
        kind == "wan")
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


# ----- saving and the legacy layout ------------------------------------------------------------------------------
def test_two_expert_adapter_saves_a_partial_release_and_loads_back(releases, tmp_path):
    model = load_adapter("wan", releases["wan2.2-a14b"], sample_shift=5.0)
    model.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    back = load_adapter("wan", tmp_path / "saved")
    assert back.boundary_ratio == 0.875 and back.sampler_name == "unipc" and back.sample_shift == 3.0
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ModelDirectoryError, match=r"saved.*missing vae/ \(not listed in model_index.json\)"):
        open_pipeline("wan", tmp_path / "saved", require=("vae",))


def test_legacy_layout_still_loads(tmp_path):
    adapter = make_tiny_wan_dir(tmp_path / "legacy", vocab_size=5, text_dim=16, seed=1)
    back = load_adapter("wan", tmp_path / "legacy", dtype=torch.float64)
    assert isinstance(back, WanAdapter) and back.dtype == torch.float64 and back.transformer_2 is None
    assert back.sampler_name == "flow_euler" and back.sample_shift == 1.0
    assert torch.equal(back.conditioner.table, adapter.conditioner.table)
    assert not (tmp_path / "legacy" / "model_index.json").exists()
    with pytest.raises(ModelDirectoryError, match=r"legacy.*holds a WanTransformer3DModel, not a "
                                                  r"CogVideoXTransformer3DModel"):
        load_adapter("cogvideox", tmp_path / "legacy")


# ----- bad directories: one clear error naming the directory and the part / family ------------------------------
def test_bad_directories_are_one_clear_error(releases, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for call in (lambda: load_adapter("wan", empty), lambda: open_pipeline("wan", empty)):
        with pytest.raises(ModelDirectoryError, match=rf"{empty}: no model_index.json"):
            call()
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        load_adapter("wan", tmp_path / "nowhere")

    cog = releases["cogvideox-2b"]
    for call in (lambda: load_adapter("wan", cog), lambda: open_pipeline("wan", cog)):
        with pytest.raises(ModelDirectoryError, match=rf"{cog} is a CogVideoXPipeline pipeline \(family "
                                                      r"'cogvideox'\), but the model kind is 'wan'"):
            call()

    no_vae = tmp_path / "no_vae"
    shutil.copytree(releases["wan2.1"], no_vae)
    shutil.rmtree(no_vae / "vae")
    pipe = open_pipeline("wan", no_vae)                       # the model itself still loads ...
    load_adapter("wan", no_vae)
    with pytest.raises(ModelDirectoryError, match=rf"{no_vae} \(WanPipeline\) is missing vae/ \(no such folder\)"):
        open_pipeline("wan", no_vae, require=("vae", "text_encoder"))   # ... the VAE is one error naming it
    with pytest.raises(ModelDirectoryError, match="missing vae/"):
        pipe.vae()

    expert_gone = tmp_path / "expert_gone"
    shutil.copytree(releases["wan2.2-a14b"], expert_gone)
    (expert_gone / "transformer_2" / "config.json").unlink()
    with pytest.raises(ModelDirectoryError, match=r"missing transformer_2/ \(no config.json in it\)"):
        load_adapter("wan", expert_gone)

    i2v = tmp_path / "i2v"
    shutil.copytree(releases["wan2.1"], i2v)
    index = json.loads((i2v / "model_index.json").read_text())
    (i2v / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ModelDirectoryError, match="is a WanImageToVideoPipeline: vidpo trains text-to-video wan"):
        PipelineDirectory.open(i2v, "wan")
    assert issubclass(ModelDirectoryError, ValueError)


def test_registry_names_each_family():
    assert {k: (s.pipelines, s.text_max_length, s.default_sampler) for k, s in MODELS.items() if s.adapter} == {
        "wan": (("WanPipeline",), 512, "flow_euler"), "cogvideox": (("CogVideoXPipeline",), 226, "ddim")}
    for spec in MODELS.values():
        assert spec.default_sampler in spec.samplers and callable(spec.parallelize)
