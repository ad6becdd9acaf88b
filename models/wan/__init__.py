"""Wan 2.1 through diffusers: ``WanAdapter`` (the engine's model interface, see ``vidpo.models.adapters``)."""
from vidpo.models.wan.model import WanAdapter, make_tiny_wan_dir, tiny_wan_transformer

__all__ = ["WanAdapter", "make_tiny_wan_dir", "tiny_wan_transformer"]
