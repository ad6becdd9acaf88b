"""The temporal attention of CogVideoX, read from its joint text-video self-attention: the probe motion guidance
(``vidpo.models.motion_guidance``) uses on a ``CogVideoXAdapter``.

**The rule.** CogVideoX has no temporal layers: every block's self-attention (``transformer_blocks[l].attn1``) is
JOINT attention over the ``L`` text tokens and the ``n = T' H' W'`` latent patches, concatenated text first. The
video tokens are in (t, h, w) row-major order, ``(T', H', W') = (T / p_t, H / p, W / p)`` with the transformer's
``patch_size`` p and ``patch_size_t`` p_t (None, i.e. 1, for CogVideoX-2B / 5B; 2 for 1.5, whose tokens are
2-frame temporal patches). Its temporal attention at block ``l`` is defined as the attention each VIDEO token would
pay to the video tokens at the SAME spatial position in every latent frame, computed from that block's own
post-LayerNorm, post-RoPE queries and keys and renormalised over those ``T'`` keys only::

    q, k        (B, heads, n, d)     the video rows of the tensors CogVideoX's attention multiplies
                                     (CogVideoXAttnProcessor2_0; the text rows 0 .. L-1 are dropped)
    A[b,h,s,i,j] = softmax_j( <q[b,h,(i,s)], k[b,h,(j,s)]> / sqrt(d) )          (B, heads, S, T', T'),  S = H' W'

which is ``vidpo.models.motion_guidance.temporal_attention`` -- the same rule as the toy DiT's and Wan's.

**Why this rule.** (1) It is what a factorised temporal-attention layer (the UNet layers MotionClone reads)
computes, with the block's own projections: a per-pixel distribution over frames saying where the content
at that position comes from in time, which is the motion signal the PTA energy matches. (2) The text tokens are
excluded, as queries and as keys: they have no spatial position and no frame, so they belong to no pixel's
column of the frame x frame map and carry no motion. Their share of the joint softmax is not a constant either:
it depends on the prompt (CogVideoX pads it to ``max_text_seq_length`` tokens, padding included in the
attention) and on how much each video token reads the text at that time step. Renormalising over the ``T'``
same-position keys removes that share, exactly as it removes the spatial share, which scales like 1 / n and
would make the energy's size depend on the resolution. (3) Pre-softmax logits are read from the projections,
not from an attention map, because CogVideoX's attention is a fused kernel (no map is ever materialised) and
the logits restricted to one spatial column cost ``n T' d`` instead of ``(L + n)^2 d``. (4) RoPE is included
(5B / 1.5, ``use_rotary_positional_embeddings``): the logits are the ones the model really uses, and RoPE's
temporal component is what makes frames distinguishable; 2B's sincos position embeddings are added to the
tokens before the first block, so its q, k already carry them. Which block: ``distill.motion_block`` (-1: the
middle one).

**How.** ``CogVideoXAttentionProbe`` swaps the probed block's attention processor for one that recomputes the
joint post-RoPE q, k (and v) from the same inputs with the same code path as ``CogVideoXAttnProcessor2_0`` (the
text-first concatenation, ``to_q`` / ``to_k`` / ``to_v`` or the fused ``to_qkv``, ``norm_q`` / ``norm_k``,
diffusers' ``apply_rotary_emb`` on the video rows with the ``image_rotary_emb`` the adapter passes in --
``CogVideoXAdapter.rotary_embedding``), hands over the video rows, and then either stops the forward pass
(``stop=True``: the energy needs nothing after this block) or lets the original processor compute the block's
output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class _StopForward(Exception):
    """Raised by the probe once it has q and k, so later blocks never run."""


class _ProbeProcessor:
    def __init__(self, probe: "CogVideoXAttentionProbe", original):
        self.probe = probe
        self.original = original

    # The parameters are named as CogVideoXAttnProcessor2_0's: diffusers' Attention drops every keyword argument
    # (image_rotary_emb included) that its processor's signature does not name.
    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_processor import FusedCogVideoXAttnProcessor2_0
        from diffusers.models.embeddings import apply_rotary_emb

        text_length = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = joint.shape[0]
        if isinstance(self.original, FusedCogVideoXAttnProcessor2_0):
            qkv = attn.to_qkv(joint)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:      # RoPE on the video rows only, in place, as the original does
            query[:, :, text_length:] = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_length:] = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)
        self.probe.observe(query, key, value, text_length)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class CogVideoXAttentionProbe:
    """Context manager capturing the post-RoPE ``q, k`` (B, heads, n, d) of the video tokens of
    ``transformer_blocks[block].attn1`` of a ``CogVideoXAdapter``'s transformer; the factory
    ``vidpo.models.motion_guidance`` takes as ``probe``. ``v`` (B, n, heads, d) of the video tokens is kept too,
    and the joint tensors ``joint_q``, ``joint_k``, ``joint_v`` (B, heads, L + n, d; the ``text_length`` = L text
    rows first), so a test can rebuild the block's attention output from what was read."""

    def __init__(self, model: torch.nn.Module, block: int, *, stop: bool = False):
        transformer = getattr(model, "transformer", model)
        blocks = transformer.transformer_blocks
        if not -len(blocks) <= block < len(blocks):
            raise ValueError(f"motion guidance block {block} out of range for a CogVideoX transformer with "
                             f"{len(blocks)} blocks (valid: {-len(blocks)} .. {len(blocks) - 1})")
        attn = blocks[block].attn1
        if not hasattr(attn, "processor"):
            raise TypeError(f"{type(attn).__name__} has no attention processor to swap; motion guidance needs the "
                            "single-device CogVideoXAdapter (diffusers' CogVideoXTransformer3DModel)")
        self.model = model
        self.transformer = transformer
        self.attn = attn
        self.stop = stop
        self.q: Optional[torch.Tensor] = None
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.joint_q: Optional[torch.Tensor] = None
        self.joint_k: Optional[torch.Tensor] = None
        self.joint_v: Optional[torch.Tensor] = None
        self.text_length: Optional[int] = None
        self._original = None

    def observe(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_length: int) -> None:
        """Keep the joint ``(B, heads, L + n, d)`` tensors and their video rows (the text comes first)."""
        self.joint_q, self.joint_k, self.joint_v, self.text_length = query, key, value, text_length
        self.q, self.k = query[:, :, text_length:], key[:, :, text_length:]
        self.v = value[:, :, text_length:].transpose(1, 2)
        if self.stop:
            raise _StopForward

    def __enter__(self) -> "CogVideoXAttentionProbe":
        if isinstance(self.attn.processor, _ProbeProcessor):
            raise RuntimeError("another probe is already attached to this attention block")
        self._original = self.attn.processor
        self.attn.processor = _ProbeProcessor(self, self._original)
        return self

    def __exit__(self, *exc) -> None:
        self.attn.processor = self._original

    def grid(self, x: torch.Tensor) -> Tuple[int, int, int]:
        """(T', H', W') of latents ``x`` (B, C, T, H, W) under the transformer's ``patch_size`` (spatial) and
        ``patch_size_t`` (temporal; None = 1 frame a token)."""
        config = self.transformer.config
        p, p_t = config.patch_size, config.patch_size_t or 1
        return x.shape[2] // p_t, x.shape[3] // p, x.shape[4] // p

    def run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward ``model(x, t, cond)`` up to the probed block; return its video ``(q, k)``."""
        self.q = self.k = self.v = self.joint_q = self.joint_k = self.joint_v = self.text_length = None
        try:
            self.model(x, t, cond)
        except _StopForward:
            pass
        if self.q is None:
            raise RuntimeError("the probed attention block did not run")
        return self.q, self.k


def transformer_depth(model: torch.nn.Module) -> int:
    """Blocks of a CogVideoX adapter's transformer."""
    return len(getattr(model, "transformer", model).transformer_blocks)
