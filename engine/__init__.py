"""vidpo: preference post-training of text-to-video diffusion / rectified-flow transformers."""

__version__ = "0.1.0"
