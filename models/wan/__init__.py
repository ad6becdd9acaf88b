"""Wan 2.1 / 2.2 through diffusers: ``WanAdapter`` (the engine's model interface, see ``vidpo.models.adapters``; Wan 2.2
A14B's two experts included)."""
from vidpo.models.wan.model import WanAdapter, make_tiny_wan_dir, tiny_wan_transformer

__all__ = ["WanAdapter", "make_tiny_wan_dir", "tiny_wan_transformer"]
