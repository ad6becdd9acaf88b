"""The diffusers video transformers ``vidpo scale`` sizes: their architecture, exact parameter counts and what
one transformer block saves for backward.

Where the architecture comes from (``resolve_architecture``): the recipe's ``model.path`` when it exists on this
machine (``transformer/config.json`` of a release directory, or of the legacy ``transformer/`` layout; a second
expert when ``transformer_2/`` exists; the VAE's compression from ``vae/config.json``), else the published
configuration of a release (``RELEASES``), named by ``--arch`` or recognised in ``model.path``
(``checkpoints/Wan2.1-T2V-14B-Diffusers`` -> ``wan2.1-t2v-14b``).

Parameters are counted exactly: the diffusers class is instantiated from the config on the meta device (no
memory, no weights), LoRA applied to it with the recipe's rank and targets (``vidpo.models.lora.apply_lora``),
and the tensor-parallel split read from the family's own plan (``wan_tp_plan`` / ``cogvideox_tp_plan``).

Activations (``SAVED_WAN`` / ``SAVED_COGVIDEOX``): every tensor one block's autograd graph keeps for backward,
per token, read off the diffusers block's forward (``WanTransformerBlock``, ``CogVideoXBlock`` in
diffusers/models/transformers/) and checked against the graph of the real block (tests/test_scale_real.py walks
``grad_fn._saved_*`` of a tiny model and compares). Each entry says its size (in units of the width D, the FFN
width F, the heads H, or one value per token), its dtype (fp32 where the block upcasts: Wan's FP32LayerNorm and
fp32 modulation, the RMS norms; 'autocast' = fp32 under bf16 autocast, where layer_norm runs in fp32; else the
compute dtype), whether tensor parallel splits it (between a column- and a row-parallel layer) or only sequence
parallel does, and whether it is kept only when the base weights train (a frozen weight needs no input saved:
under LoRA the modulation's LayerNorm output, the frozen layers' inputs and the gates' operands are not kept).
Attention is the flash / memory-efficient SDPA kernel: q, k, v, the output and the log-sum-exp per head, no
n x n matrix. LoRA adds, per adapted layer, its rank-r bottleneck and its input when nothing else keeps it.
Wan 2.2 TI2V-5B trains with a scalar timestep (``WanAdapter``: the same for every token in text-to-video), so its
blocks save what Wan 2.1's do, not the per-token modulation of its pipeline's ``expand_timesteps``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import resolve_path
from vidpo.models.cogvideox.parallelize import cogvideox_tp_plan
from vidpo.models.lora import apply_lora, lora_modules
from vidpo.models.wan.parallelize import wan_tp_plan

# ----- the published releases ---------------------------------------------------------------------------------
# transformer/config.json of each diffusers release (Hugging Face: Wan-AI/<name>-Diffusers, THUDM/CogVideoX-2b /
# -5b). Checked against diffusers 0.42 here: WanTransformer3DModel's defaults ARE Wan 2.1 14B's (40 layers, 40
# heads x 128, ffn 13824, text_dim 4096, freq_dim 256, patch (1, 2, 2)) and CogVideoXTransformer3DModel's ARE
# CogVideoX-2B's (30 layers, 30 heads x 64, time_embed_dim 512, text 4096, 226 text tokens, patch 2, 49 frames of
# 60 x 90 latents); FeedForward's default inner width is 4 D (CogVideoX 2B 7680, 5B 12288); the parameter counts
# on the meta device are the releases' (1.42 B, 14.29 B, 5.00 B, 1.69 B, 5.57 B). Wan 2.2 TI2V-5B's (24 heads,
# ffn 14336, 30 layers, in/out 48 channels) matches the copies hard-coded in public training code; Wan 2.1 1.3B's
# heads (12) and ffn (8960) and CogVideoX-5B's 48 heads / 42 layers / RoPE are from the release configs as
# published, not re-read here (no download). VAE compression (time x space): Wan 2.1 VAE 4 x 8 (z 16), Wan 2.2
# VAE 4 x 16 (z 48; AutoencoderKLWan scale_factor_temporal / _spatial), CogVideoX VAE 4 x 8
# (temporal_compression_ratio 4, four down blocks). Text tokens: WanPipeline / CogVideoXPipeline's
# max_sequence_length (512 / 226).
_WAN = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
_WAN_14B = dict(_WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40)
_COGVIDEOX = dict(attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
                  sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
                  max_text_seq_length=226)


@dataclass(frozen=True)
class Release:
    family: str
    config: dict
    experts: int = 1
    temporal_compression: int = 4
    spatial_compression: int = 8
    text_tokens: int = 512
    pattern: str = ""          # recognised in a model path (lower case)


RELEASES = {
    "wan2.1-t2v-1.3b": Release("wan", dict(_WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30),
                               pattern=r"wan2\.?1.*1\.3b"),
    "wan2.1-t2v-14b": Release("wan", _WAN_14B, pattern=r"wan2\.?1.*14b"),
    "wan2.2-ti2v-5b": Release("wan", dict(_WAN, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                                          out_channels=48), spatial_compression=16, pattern=r"wan2\.?2.*ti2v.*5b"),
    # Two experts of Wan 2.1 14B's shape (transformer/ for high noise, transformer_2/ for low noise).
    "wan2.2-t2v-a14b": Release("wan", _WAN_14B, experts=2, pattern=r"wan2\.?2.*a14b"),
    "cogvideox-2b": Release("cogvideox", dict(_COGVIDEOX, num_attention_heads=30, num_layers=30),
                            text_tokens=226, pattern=r"cogvideox.*2b"),
    "cogvideox-5b": Release("cogvideox", dict(_COGVIDEOX, num_attention_heads=48, num_layers=42,
                                              use_rotary_positional_embeddings=True),
                            text_tokens=226, pattern=r"cogvideox.*5b"),
}
CLASSES = {"wan": "WanTransformer3DModel", "cogvideox": "CogVideoXTransformer3DModel"}
TP_PLANS = {"wan": wan_tp_plan, "cogvideox": cogvideox_tp_plan}


class ArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    """A diffusers video transformer as ``vidpo scale`` needs it (module docstring)."""

    name: str
    family: str
    config: dict
    experts: int
    temporal_compression: int
    spatial_compression: int
    text_tokens: int
    source: str

    @property
    def heads(self) -> int:
        return int(self.config.get("num_attention_heads", 40 if self.family == "wan" else 30))

    @property
    def head_dim(self) -> int:
        return int(self.config.get("attention_head_dim", 128 if self.family == "wan" else 64))

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def depth(self) -> int:
        return int(self.config.get("num_layers", 40 if self.family == "wan" else 30))

    @property
    def ffn(self) -> int:
        return int(self.config.get("ffn_dim", 13824)) if self.family == "wan" else 4 * self.width

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 16))

    @property
    def patch(self) -> tuple[int, int, int]:
        if self.family == "wan":
            return tuple(int(p) for p in self.config.get("patch_size", (1, 2, 2)))
        p = int(self.config.get("patch_size", 2))
        return (int(self.config.get("patch_size_t") or 1), p, p)

    @property
    def joint_text(self) -> bool:
        """CogVideoX attends jointly over [text; video]: the text tokens run through every block."""
        return self.family == "cogvideox"

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The VAE's latent (T, H, W) of ``frames`` pixel frames of ``height`` x ``width`` (causal: first frame
        alone, then ``temporal_compression`` frames per latent frame)."""
        return ((frames - 1) // self.temporal_compression + 1, height // self.spatial_compression,
                width // self.spatial_compression)

    def tokens(self, frames: int, height: int, width: int) -> int:
        t, h, w = self.latent_grid(frames, height, width)
        pt, ph, pw = self.patch
        return (t // pt) * (h // ph) * (w // pw)

    def build(self) -> torch.nn.Module:
        """One expert, on the meta device (no memory)."""
        import diffusers

        cls = getattr(diffusers, CLASSES[self.family])
        kwargs = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            return cls(**kwargs)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchitectureError(f"{path}: cannot read it as JSON ({exc})") from None


def _from_directory(root: Path, kind: str) -> Architecture:
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ArchitectureError(f"model.path {root} has no transformer/config.json")
    config = _read_json(config_path)
    found = config.get("_class_name")
    if found and found != CLASSES[kind]:
        raise ArchitectureError(f"{config_path} is a {found}, not model.kind '{kind}' ({CLASSES[kind]})")
    experts = 2 if (root / "transformer_2" / "config.json").is_file() else 1
    temporal, spatial = 4, 8
    vae_path = root / "vae" / "config.json"
    if vae_path.is_file():
        vae = _read_json(vae_path)
        if kind == "wan":
            temporal = int(vae.get("scale_factor_temporal", 4))
            spatial = int(vae.get("scale_factor_spatial", 8))
        else:
            temporal = int(vae.get("temporal_compression_ratio", 4))
            spatial = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    text = int(config.get("max_text_seq_length", 226)) if kind == "cogvideox" else 512
    return Architecture(str(root), kind, config, experts, temporal, spatial, text, source=str(config_path))


def _from_release(name: str, kind: str, why: str) -> Architecture:
    rel = RELEASES[name]
    if rel.family != kind:
        raise ArchitectureError(f"release '{name}' is a {rel.family} model, not model.kind '{kind}'")
    return Architecture(name, rel.family, dict(rel.config), rel.experts, rel.temporal_compression,
                        rel.spatial_compression, rel.text_tokens, source=f"published config of {name} ({why})")


def recognise_release(path: str) -> Optional[str]:
    """The release named in a model path (``checkpoints/Wan2.1-T2V-1.3B-Diffusers`` -> 'wan2.1-t2v-1.3b')."""
    text = str(path).lower()
    for name, rel in RELEASES.items():
        if re.search(rel.pattern, text):
            return name
    return None


def resolve_architecture(kind: str, path: Optional[str], arch: Optional[str] = None) -> Architecture:
    """The architecture of ``model.kind`` / ``model.path`` (module docstring): ``arch`` (a ``RELEASES`` name)
    wins; else the directory when it exists (a recipe's path: ``vidpo.config.resolve_path``); else the release
    its name recognises. ArchitectureError naming what to pass otherwise."""
    if kind not in CLASSES:
        raise ArchitectureError(f"model.kind '{kind}' has no diffusers architecture")
    if arch is not None:
        if arch not in RELEASES:
            raise ArchitectureError(f"--arch '{arch}' is not one of {sorted(RELEASES)}")
        return _from_release(arch, kind, "--arch")
    if path:
        local = resolve_path(path)
        if local.exists():
            return _from_directory(local, kind)
        name = recognise_release(path)
        if name is not None:
            return _from_release(name, kind, f"named by model.path {path}, which is not on this machine")
    raise ArchitectureError(f"model.path {path!r} does not exist here and names no known release; pass --arch, "
                            f"one of {sorted(RELEASES)}")


# ----- parameters ------------------------------------------------------------------------------------------------
@dataclass
class ParameterCount:
    """Exact counts for ONE expert (meta-device instantiation)."""

    total: int
    block: int                 # one transformer block
    tp_split: int              # parameters tensor parallel splits (the family's plan)
    lora: int = 0              # LoRA factors with the recipe's rank and targets
    lora_layers: dict = field(default_factory=dict)   # adapted module name inside a block -> count of such layers


def count_parameters(arch: Architecture, lora_rank: Optional[int] = None,
                     lora_targets: tuple[str, ...] = ()) -> ParameterCount:
    """Exact counts of one expert of ``arch`` (and of its LoRA factors with ``lora_rank`` / ``lora_targets``)."""
    count = _count(arch.family, json.dumps(arch.config, sort_keys=True), lora_rank, tuple(lora_targets))
    return dataclasses.replace(count, lora_layers=dict(count.lora_layers))


@functools.lru_cache(maxsize=32)
def _count(family: str, config_json: str, lora_rank: Optional[int], lora_targets: tuple) -> ParameterCount:
    arch = Architecture("", family, json.loads(config_json), 1, 4, 8, 0, "")
    model = arch.build()
    blocks = model.blocks if arch.family == "wan" else model.transformer_blocks
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in blocks[0].parameters())
    params = dict(model.named_parameters())
    split = sum(params[name].numel() for name in TP_PLANS[arch.family](model))
    count = ParameterCount(total, block, split)
    if lora_rank:
        apply_lora(model, rank=lora_rank, alpha=float(lora_rank), target_modules=list(lora_targets))
        for name, module in lora_modules(model):
            count.lora += module.lora_A.weight.numel() + module.lora_B.weight.numel()
            inner = re.sub(r"^(blocks|transformer_blocks)\.\d+\.", "", name)
            if inner != name:
                count.lora_layers[inner] = count.lora_layers.get(inner, 0) + 1
    return count


# ----- what a block saves for backward ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Saved:
    what: str
    size: str            # 'D' width, 'F' FFN width, 'H' heads (one value per head), '1' one value per token
    dtype: str           # 'fp32' | 'autocast' (fp32 under bf16 autocast, else compute) | 'compute'
    split: str           # 'tp': split by tensor parallel; 'seq': only by sequence parallel; 'gathered': by neither
                         # (saved after the sequence-parallel all-gather: the whole sequence on every rank)
    count: float = 1.0
    full_only: bool = False   # kept only when the base weights train


# WanTransformerBlock.forward, per video token (diffusers/models/transformers/transformer_wan.py).
SAVED_WAN = (
    Saved("norm1 / norm2 / norm3 FP32LayerNorm inputs (hidden.float())", "D", "fp32", "seq", 3),
    Saved("the three LayerNorms' mean and rstd", "1", "fp32", "seq", 6),
    Saved("norm1 / norm3 outputs, for the (1 + scale) modulation's gradient", "D", "fp32", "seq", 2, True),
    Saved("inputs of attn1.to_q/k/v, attn2.to_q, ffn.net.0.proj", "D", "compute", "seq", 3, True),
    Saved("attn1 norm_q / norm_k and attn2 norm_q RMSNorm inputs (upcast)", "D", "fp32", "tp", 3),
    Saved("the RMSNorms' normalised outputs, for their weights' gradient", "D", "fp32", "tp", 3, True),
    Saved("the RMSNorms' rstd", "1", "fp32", "tp", 3),
    Saved("attn1 SDPA q, k, v, output (= attn1.to_out input)", "D", "compute", "tp", 4),
    Saved("attn2 SDPA q, output (= attn2.to_out input)", "D", "compute", "tp", 2),
    Saved("attn1 / attn2 SDPA log-sum-exp", "H", "fp32", "tp", 2),
    Saved("attn1 output, for the gate_msa gradient", "D", "compute", "seq", 1, True),
    Saved("ffn output (float), for the c_gate_msa gradient", "D", "fp32", "seq", 1, True),
    Saved("GELU input (ffn.net.0.proj output)", "F", "compute", "tp", 1),
    Saved("ffn.net.2 input (GELU output)", "F", "compute", "tp", 1, True),
)
# Per text token of one block: the cross-attention's keys and values (and their RMS norm).
SAVED_WAN_TEXT = (
    Saved("attn2 SDPA k, v", "D", "compute", "tp", 2),
    Saved("attn2 norm_k input (upcast)", "D", "fp32", "tp", 1),
    Saved("attn2 norm_k output", "D", "fp32", "tp", 1, True),
)
# LoRA: the input each adapted layer keeps when nothing else does, grouped by the tensor (q/k/v share theirs).
WAN_LORA_INPUTS = {("attn1.to_q", "attn1.to_k", "attn1.to_v"): "D", ("attn2.to_q",): "D",
                   ("ffn.net.0.proj",): "D", ("ffn.net.2",): "F"}

# CogVideoXBlock.forward, per token of the joint [text; video] sequence
# (diffusers/models/transformers/cogvideox_transformer_3d.py, CogVideoXAttnProcessor2_0).
SAVED_COGVIDEOX = (
    Saved("norm1 / norm2 LayerNorm inputs", "D", "autocast", "seq", 2),
    Saved("their mean and rstd", "1", "fp32", "seq", 4),
    Saved("norm1 / norm2 outputs, for the modulation's gradient", "D", "autocast", "seq", 2, True),
    # One gathered joint input per region, shared by its projections (vidpo.models.cogvideox.parallelize)
    Saved("inputs of to_q/k/v and ff.net.0.proj", "D", "compute", "gathered", 2, True),
    Saved("norm_q / norm_k LayerNorm inputs (per head)", "D", "autocast", "tp", 2),
    Saved("norm_q / norm_k mean and rstd (per head)", "H", "fp32", "tp", 4),
    Saved("SDPA q, k, v, output", "D", "compute", "tp", 4),
    Saved("SDPA log-sum-exp", "H", "fp32", "tp", 1),
    Saved("to_out.0 input (the output, transposed)", "D", "compute", "tp", 1, True),
    Saved("attention output, for the gate's gradient", "D", "compute", "seq", 1, True),
    Saved("GELU input", "F", "compute", "tp", 1),
    Saved("ff.net.2 input (GELU output)", "F", "compute", "tp", 1, True),
    Saved("feed-forward output, for the gate's gradient", "D", "compute", "seq", 1, True),
)
COGVIDEOX_LORA_INPUTS = {("attn1.to_q", "attn1.to_k", "attn1.to_v"): "D", ("attn1.to_out.0",): "D",
                         ("ff.net.0.proj",): "D", ("ff.net.2",): "F"}


@dataclass(frozen=True)
class Precision:
    """Bytes of the compute dtype and of 'autocast' entries (module docstring)."""

    compute: int = 2
    autocast: int = 4

    def of(self, dtype: str) -> int:
        return {"fp32": 4, "autocast": self.autocast, "compute": self.compute}[dtype]


def _size(arch: Architecture, size: str) -> int:
    return {"D": arch.width, "F": arch.ffn, "H": arch.heads, "1": 1}[size]


def saved_bytes(entries, arch: Architecture, precision: Precision, *, full: bool, tp: int = 1,
                sp: bool = False) -> float:
    """Bytes one block keeps per token on one GPU for ``entries`` (``full``: the base weights train)."""
    total = 0.0
    for e in entries:
        if e.full_only and not full:
            continue
        div = tp if (e.split == "tp" or (sp and e.split == "seq")) else 1
        total += e.count * _size(arch, e.size) * precision.of(e.dtype) / div
    return total


def lora_saved_bytes(arch: Architecture, count: ParameterCount, rank: int, precision: Precision) -> tuple:
    """(per video token, per text token) bytes per block the LoRA adapters add: the rank-r bottleneck of each
    adapted layer, and its input when the frozen model keeps none (LoRA is not tensor-parallel)."""
    depth = arch.depth
    layers = {name: n / depth for name, n in count.lora_layers.items()}
    text_layers = ("attn2.to_k", "attn2.to_v") if arch.family == "wan" else ()
    video = sum(per for name, per in layers.items() if name not in text_layers) * rank
    text = sum(per for name, per in layers.items() if name in text_layers) * rank
    groups = WAN_LORA_INPUTS if arch.family == "wan" else COGVIDEOX_LORA_INPUTS
    for names, size in groups.items():
        if any(name in layers for name in names):
            video += _size(arch, size)
    return video * precision.compute, text * precision.compute


def block_entries(arch: Architecture):
    """(video-token entries, text-token entries) of one block; CogVideoX's text runs through the same ops."""
    if arch.family == "wan":
        return SAVED_WAN, SAVED_WAN_TEXT
    return SAVED_COGVIDEOX, SAVED_COGVIDEOX
