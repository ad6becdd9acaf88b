"""The temporal attention of Wan, read from its full 3-D self-attention: the probe motion guidance
(``vidpo.models.motion_guidance``) uses on a ``WanAdapter``.

**The rule.** Wan has no temporal layers: every block's self-attention (``blocks[l].attn1``) attends over all
``n = T' H' W'`` latent patches at once (tokens in (t, h, w) row-major order, ``(T', H', W') = (T / p_t, H / p_h,
W / p_w)`` with the transformer's ``patch_size``). Its temporal attention at block ``l`` is defined as the
attention each token would pay to the tokens at the SAME spatial position in every frame, computed from that
block's own post-RMSNorm, post-RoPE queries and keys and renormalised over those ``T'`` keys only::

    q, k        (B, heads, n, d)          exactly the tensors Wan's attention multiplies (WanAttnProcessor)
    A[b,h,s,i,j] = softmax_j( <q[b,h,(i,s)], k[b,h,(j,s)]> / sqrt(d) )          (B, heads, S, T', T'),  S = H' W'

which is ``vidpo.models.motion_guidance.temporal_attention`` -- the same rule as the toy DiT's.

**Why this rule.** (1) It is what a factorised temporal-attention layer (the UNet layers MotionClone reads)
computes, with the block's own projections: a per-pixel distribution over frames saying where the content
at that position comes from in time, which is the motion signal the PTA energy matches. (2) The slice of
the full softmax (normalised over all n keys) is not used: its mass on the T' same-position keys depends on
how much the query attends spatially, scales like 1 / n and would make the energy's size depend on the
resolution; renormalising over frames removes both. (3) Pre-softmax logits are read from the projections,
not from an attention map, because Wan's attention is a fused kernel (no map is ever materialised) and the
logits restricted to one spatial column cost ``n T' d`` instead of ``n^2 d``. (4) RoPE is included: the logits
are the ones the model really uses, and RoPE's temporal component is what makes frames distinguishable.
Which block: ``distill.motion_block`` (-1: the middle one). A two-expert Wan 2.2 A14B is probed in the expert
that denoises each row at its time (the adapter's routing: ``transformer`` at ``t >= boundary``, else
``transformer_2``), both experts having the same layout.

**How.** ``WanAttentionProbe`` swaps the probed block's attention processor for one that recomputes the
post-RoPE q, k from the same inputs with the same code path (``_get_qkv_projections``, ``norm_q`` / ``norm_k``,
the rotary embedding passed in), hands them over, and then either stops the forward pass (``stop=True``: the
energy needs nothing after this block) or lets the original processor compute the block's output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class _StopForward(Exception):
    """Raised by the probe once it has q and k, so later blocks never run."""


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding (WanAttnProcessor's ``apply_rotary_emb``) on ``x`` (B, n, heads, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _ProbeProcessor:
    def __init__(self, probe: "WanAttentionProbe", original):
        self.probe = probe
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        self.probe.observe(query.transpose(1, 2), key.transpose(1, 2), value.unflatten(2, (attn.heads, -1)))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


class WanAttentionProbe:
    """Context manager capturing the post-RoPE ``q, k`` (B, heads, n, d) of ``blocks[block].attn1`` of a
    ``WanAdapter``'s (high-noise) transformer; the factory ``vidpo.models.motion_guidance`` takes as ``probe``.
    ``v`` (B, n, heads, d) is kept too, so a test can rebuild the block's attention output from what was read."""

    def __init__(self, model: torch.nn.Module, block: int, *, stop: bool = False):
        transformer = getattr(model, "transformer", model)
        experts = [transformer] + ([model.transformer_2] if getattr(model, "transformer_2", None) is not None else [])
        blocks = transformer.blocks
        if not -len(blocks) <= block < len(blocks):
            raise ValueError(f"motion guidance block {block} out of range for a Wan transformer with {len(blocks)} "
                             "blocks")
        self.model = model
        self.transformer = transformer
        self.attns = [expert.blocks[block].attn1 for expert in experts]
        self.attn = self.attns[0]
        self.stop = stop
        self.q: Optional[torch.Tensor] = None
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self._originals: list = []

    def observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.q, self.k, self.v = q, k, v
        if self.stop:
            raise _StopForward

    def __enter__(self) -> "WanAttentionProbe":
        if any(isinstance(attn.processor, _ProbeProcessor) for attn in self.attns):
            raise RuntimeError("another probe is already attached to this attention block")
        self._originals = [attn.processor for attn in self.attns]
        for attn, original in zip(self.attns, self._originals):
            attn.processor = _ProbeProcessor(self, original)
        return self

    def __exit__(self, *exc) -> None:
        for attn, original in zip(self.attns, self._originals):
            attn.processor = original

    def grid(self, x: torch.Tensor) -> Tuple[int, int, int]:
        """(T', H', W') of latents ``x`` (B, C, T, H, W) under the transformer's patch size."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        return x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w

    def _run_one(self, x, t, cond) -> Tuple[torch.Tensor, torch.Tensor]:
        self.q = self.k = self.v = None
        try:
            self.model(x, t, cond)
        except _StopForward:
            pass
        if self.q is None:
            raise RuntimeError("the probed attention block did not run")
        return self.q, self.k

    def run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward ``model(x, t, cond)`` up to the probed block; return its ``(q, k)``. With two experts the rows
        of each run through their own expert separately (one forward each) and come back in order."""
        route = getattr(self.model, "high_noise", None)
        if len(self.attns) == 1 or route is None:
            return self._run_one(x, t, cond)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        high = route(t)
        groups = [rows for rows in (high.nonzero().flatten(), (~high).nonzero().flatten()) if rows.numel()]
        if len(groups) == 1:
            return self._run_one(x, t, cond)
        parts = [self._run_one(x[rows], t[rows], cond[rows]) for rows in groups]
        order = torch.argsort(torch.cat(groups))
        self.q = torch.cat([q for q, _ in parts])[order]
        self.k = torch.cat([k for _, k in parts])[order]
        self.v = None
        return self.q, self.k


def transformer_depth(model: torch.nn.Module) -> int:
    """Blocks of a Wan adapter's (high-noise) transformer."""
    return len(getattr(model, "transformer", model).blocks)
