"""VAE decode throughput: diffusers' AutoencoderKLWan with the Wan 2.1 VAE configuration and random weights.

The constructor's defaults ARE the Wan 2.1 VAE's published config (base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4],
2 residual blocks, temporal downsampling [False, True, True]: 4x time, 8x space), so the decoder measured here does
exactly the work of the release's; weights are random (nothing is downloaded). One decode of a (C, T, H, W) latent
gives 1 + 4 (T - 1) frames of 8H x 8W: 16 x 21 x 60 x 104 -> 81 frames of 480 x 832 (Wan 2.1 at 480p, 5 s).

Before timing, a check: the decoder in the benchmark's dtype against a float32 copy of the same weights on a small
latent (shape, finite values, relative error under the dtype's tolerance). A failed check exits with status 1 and
no speed is written. Rows (time per decode, frames/s, peak memory on a GPU) go to benchmarks/results/vae.csv.

    python benchmarks/bench_vae.py --device cuda                                  # bf16, 16x21x60x104, 1 video
    python benchmarks/bench_vae.py --device cpu --tiny --latent 16,3,8,8          # a tiny decoder, for tests
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from step_bench import time_steps  # noqa: E402

KERNEL = "vae_decode"
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vae.csv")
GPU_LATENT, CPU_LATENT = (16, 21, 60, 104), (16, 3, 16, 16)
# A decoder of the same geometry (z 16, 4x time, 8x space) small enough for CPU tests.
TINY_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True, True])
CHECK_LATENT = (3, 8, 8)                    # T, H, W of the self-check
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}   # |err|_2 / |reference|_2


def build_vae(tiny: bool, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Built on ``device`` (a GPU initialises the 127 M random weights in milliseconds), same weights any dtype."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**(TINY_CONFIG if tiny else {})).eval().to(dtype)


def decoded_shape(latent, batch: int):
    c, t, h, w = latent
    return (batch, 3, 1 + 4 * (t - 1), 8 * h, 8 * w)


def check_decoder(vae, reference_vae, device, dtype, channels: int) -> float:
    """Relative L2 error of ``vae`` (``dtype``) against the float32 ``reference_vae`` on a small random latent;
    raises AssertionError on a wrong shape, a non-finite value or an error above TOLERANCE[dtype]."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn((1, channels) + CHECK_LATENT, generator=g).to(device)
    with torch.no_grad():
        out = vae.decode(z.to(dtype)).sample.float()
        ref = reference_vae.decode(z).sample.float()
    expected = decoded_shape((channels,) + CHECK_LATENT, 1)
    assert tuple(out.shape) == expected, f"decoded shape {tuple(out.shape)}, expected {expected}"
    assert torch.isfinite(out).all(), "the decoder produced non-finite values"
    error = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    assert error <= TOLERANCE[dtype], f"{dtype} decode differs from float32 by {error:.3g} (relative L2)"
    return error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--latent", default=None, help="C,T,H,W of one latent (default 16,21,60,104 GPU; 16,3,16,16 CPU)")
    p.add_argument("--batch", type=int, default=1, help="videos per decode call")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="decoder dtype (default bfloat16 GPU, float32 CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny decoder of the same geometry (CPU tests)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=DEFAULT_RESULTS, help="CSV to append to (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, measure nothing")
    args = p.parse_args(argv)
    if args.latent is not None:
        try:
            args.latent = tuple(int(v) for v in args.latent.split(","))
        except ValueError:
            p.error(f"--latent must be C,T,H,W integers, got {args.latent!r}")
        if len(args.latent) != 4 or min(args.latent) < 1:
            p.error(f"--latent must be four positive integers C,T,H,W, got {args.latent}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu_requested = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    latent = args.latent or (GPU_LATENT if gpu_requested else CPU_LATENT)
    frames = decoded_shape(latent, args.batch)[2] * args.batch
    if args.dry_run:
        print(f"dry run: decode {args.batch} x {latent} -> {decoded_shape(latent, args.batch)} "
              f"({'tiny' if args.tiny else 'Wan 2.1'} VAE), {args.warmup} + {args.repeats} decodes")
        return 0
    device = common.resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    vae = build_vae(args.tiny, device)
    if latent[0] != vae.config.z_dim:
        raise SystemExit(f"--latent has {latent[0]} channels; the VAE's z_dim is {vae.config.z_dim}")
    reference_vae = vae
    if dtype != torch.float32:
        reference_vae, vae = vae, build_vae(args.tiny, device, dtype)
    try:
        error = check_decoder(vae, reference_vae, device, dtype, latent[0])
    except AssertionError as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    if reference_vae is not vae:
        del reference_vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"check: {dtype} decode within {error:.2g} of float32 (tolerance {TOLERANCE[dtype]:g})")

    z = torch.randn((args.batch,) + tuple(latent), generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def decode():
        with torch.no_grad():
            return vae.decode(z).sample

    samples = time_steps(decode, device, warmup=args.warmup, repeats=args.repeats)
    _, peak, _ = common.memory_of_call(decode, device) if device.type == "cuda" else (None, None, None)
    ms = common.quantiles(samples)
    meta = (common.device_description(device), common.timestamp(), common.versions(), common.command_line())
    x = f"{'tiny' if args.tiny else 'wan2.1'}-B{args.batch}xC{latent[0]}xT{latent[1]}xH{latent[2]}xW{latent[3]}"
    mode = str(dtype).replace("torch.", "")
    rows = [common.make_row(KERNEL, "diffusers", mode, "time", "ms", x, ms, *meta),
            common.make_row(KERNEL, "diffusers", mode, "frames_per_s", "frames/s", x,
                            (frames / (ms[0] * 1e-3), frames / (ms[2] * 1e-3), frames / (ms[1] * 1e-3)), *meta),
            common.make_row(KERNEL, "diffusers", mode, "check_error", "relative", x, error, *meta)]
    if peak is not None:
        rows.append(common.make_row(KERNEL, "diffusers", mode, "peak_memory", "MiB", x, peak, *meta))
    print(f"device: {meta[0]}; {x} {mode}: {ms[0]:.1f} ms per decode (p20-p80 {ms[1]:.1f}-{ms[2]:.1f}), "
          f"{frames / (ms[0] * 1e-3):.1f} frames/s" + (f", peak {peak:.0f} MiB" if peak is not None else ""))
    written = common.append_rows(args.out, rows)
    print(f"appended {written} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
