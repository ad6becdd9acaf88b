"""The diffusers adapters parallelized (``vidpo.models.wan.parallelize``, ``vidpo.models.cogvideox.parallelize``)
against the single-process diffusers model, with 2 real gloo processes on CPU (the harness: ``helpers.parallel``).

Per model: forward outputs, every parameter gradient and a sampled clip under each layout (Wan: TP=2, TP=2 + SP
with activation checkpointing, CP=2 (Ulysses), DP=2 sharded (FSDP2); CogVideoX: TP=2 with activation
checkpointing, TP=2 + SP (the video stream split by tokens) with activation checkpointing, CP=2 (Ulysses over the
video stream, the text stream replicated) and DP=2 FSDP for the 2B layout (sincos positions), TP=2, TP=2 + SP and
CP=2 for the 5B layout (3-D RoPE), CP=2 and TP=2 + SP for the 1.5 layout (RoPE, 2-frame temporal patches)); the
refusals (LoRA, Wan image-to-video, CogVideoX fused projections); then one DenseDPO training step of ``vidpo train``
against the same step in one process (loss, gradient norm, updated weights): full fine-tuning with a frozen
reference under TP, TP + SP and CP=2, LoRA (reference = adapters off) under DP=2 FSDP.

Each model is prepared and its two worker processes are spawned once, when a test first needs them (the
module-scoped ``runs`` keeps them per model, whatever order the tests run in); one pytest test per check asserts
that both ranks passed.
"""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("megatron.core")

from helpers.distributed import assert_all_ranks_ok  # noqa: E402
from helpers.parallel import (CASES, assert_step_matches_one_process, make_inputs, make_model, prepare,  # noqa: E402
                              resolve, run_workers)


def over_models(items):
    """``(kind, item)`` parameters, ids ``<kind>-<item>``: every model with each of ``items(case)``."""
    return [pytest.param(kind, item, id=f"{kind}-{item or 'default'}")
            for kind, case in CASES.items() for item in items(case)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kind -> (prepared, per-rank verdicts): the model's directory, pairs and single-process steps
    (``helpers.parallel.prepare``), then every check in 2 worker processes; each model once, on first use."""
    done = {}

    def get(kind):
        if kind not in done:
            case = CASES[kind]
            prepared = prepare(case, tmp_path_factory.mktemp(f"{kind}_train"))
            done[kind] = prepared, run_workers(case, prepared, tmp_path_factory.mktemp(f"{kind}_parallel"))
        return done[kind]
    return get


@pytest.mark.parametrize("kind, name", over_models(lambda case: [*case.layouts, "unsupported"]))
def test_parallel_matches_single_process(runs, kind, name):
    _, verdicts = runs(kind)
    assert_all_ranks_ok(verdicts, name)


@pytest.mark.parametrize("kind, name", over_models(lambda case: case.train_layouts))
def test_parallel_training_step_matches_one_process(runs, kind, name):
    prepared, verdicts = runs(kind)
    assert_all_ranks_ok(verdicts, name)
    case = CASES[kind]
    variant = case.train_layouts[name][0]
    assert_step_matches_one_process(prepared["root"] / f"single_{variant}", prepared["root"] / name,
                                    make_model(case, channels=case.train_channels).state_dict(),
                                    lora=variant == "lora", what=name, ignore=case.ignore_in_training_step)


@pytest.mark.parametrize("kind, architecture", over_models(lambda case: case.architectures))
def test_single_process_parallel_form_is_the_diffusers_model(kind, architecture):
    """Without process groups the parallel modules reduce to the diffusers computation (same names, order,
    outputs), and the parallel form refuses to save itself as a single-process model."""
    from vidpo.models.dit.parallelize import ShardSpec

    case = CASES[kind]
    adapter_cls, transformer_cls = resolve(case.single_process_form)
    reference = make_model(case, architecture)
    model = make_model(case, architecture)
    model = adapter_cls(model, transformer_cls(model.transformer, ShardSpec()))
    x, t, cond, _ = make_inputs(case.channels)
    torch.testing.assert_close(model(x, t, cond), reference(x, t, cond), rtol=0, atol=0)
    # Same names in the same order (a checkpoint's index-keyed optimizer state relies on the order).
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    with pytest.raises(NotImplementedError, match=f"into a {case.adapter}"):
        model.save_pretrained("unused")
