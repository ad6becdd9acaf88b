"""The IPO critic: a segment-level video scorer of (clip or latent, condition), trained by ``vidpo.ipo.critic``.

    from vidpo.models.critic import VideoCritic, load_critic
    scores = critic(clips, tokens, segment_ids)   # .frames (B, T), .segments (B, S), .video (B,)
"""
from .model import CriticScores, VideoCritic, load_critic, save_critic, segment_means

__all__ = ["CriticScores", "VideoCritic", "load_critic", "save_critic", "segment_means"]
