"""IPO critics: segment-level video scorers of (clip, prompt), trained by ``vidpo.ipo.critic``.

    from vidpo.models.critic import Critic, load_critic
    scores = critic.score(clips, captions, segment_ids)   # .frames (n, F), .segments (n, S), .video (n,)

``Critic`` is the scoring interface; ``VideoCritic`` the toy network of the shapes world (wrapped with the world
by ``vidpo.labeling.critic.ShapesCritic``), ``VLMCritic`` the critic on a vision-language backbone.
"""
from .io import CRITIC_FILE, critic_file, critic_format, load_critic, save_critic
from .model import Critic, CriticScores, VideoCritic, Views, segment_means
from .vlm import VLMCritic, VLMCriticSettings, load_vlm_critic

__all__ = ["CRITIC_FILE", "Critic", "CriticScores", "VLMCritic", "VLMCriticSettings", "VideoCritic", "Views",
           "critic_file", "critic_format", "load_critic", "load_vlm_critic", "save_critic", "segment_means"]
