"""The IPO sections: the critic that labels pairs (``critic``) and the rounds of iterative preference
optimisation with critic refinement (``iterate``, ``vidpo iterate``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from vidpo.config.choices import (
    Granularity,
    IterateReference,
    Pairing,
    PointwiseMode,
    RefinePairs,
    RoundLabeler,
    VoteSource,
)
from vidpo.config.fields import Problem, Problems, Section, choice
from vidpo.models.critic.vlm import DEFAULT_INSTRUCTION
from vidpo.models.dit.config import DiTConfig

CRITIC_POOLINGS = ("last", "mean")
BACKBONE_DTYPES = ("float32", "bfloat16")
SEED_LABELERS = ("auto", "oracle", "human", "vlm")


@dataclass
class CriticConfig(Section):
    """The IPO critic: a segment-level video scorer trained on preference pairs with a Bradley-Terry loss that
    handles ties (Davidson), used as labeller ``critic``. Without ``backbone`` it is the toy network of the shapes
    world (``vidpo.models.critic.VideoCritic``); with it, a vision-language model with LoRA and a scoring head
    (``vidpo.models.critic.vlm.VLMCritic``), the critic of prompt-file runs."""

    checkpoint: Optional[str] = None
    """Critic weights (critic.safetensors or its directory, of either kind) that ``label.labeler=critic`` labels
    with. ``vidpo iterate`` sets it per round."""

    backbone: Optional[str] = None
    """A local transformers vision-language model directory (``AutoModelForImageTextToText`` weights and a processor
    with a chat template): the critic is then the VLM critic, scoring each segment's frames with the prompt through
    the backbone, LoRA on it and a linear head on its pooled last hidden layer. width, depth, num_heads, patch_size,
    frame_differences and augment are the toy network's and do not apply to it."""

    frames_per_segment: int = 2
    """VLM critic: frames of each segment shown to the backbone, evenly spaced over it (first and last included)."""

    pooling: str = choice("last", CRITIC_POOLINGS)
    """VLM critic: the hidden state the head reads, 'last' (the last token, after the chat template's generation
    prompt) or 'mean' (over the non-padding tokens)."""

    instruction: str = DEFAULT_INSTRUCTION
    """VLM critic: the text after the frames; {caption} is replaced by the prompt."""

    lora_rank: int = 8
    """VLM critic: rank of the LoRA adapters on the backbone."""

    lora_alpha: float = 16.0
    """VLM critic: LoRA alpha (the update is scaled by alpha / rank)."""

    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """VLM critic: linear layers that get adapters (a name matches the end of a module path, in the vision tower
    and the language model alike)."""

    lora_dropout: float = 0.1
    """VLM critic: dropout on the adapters' input; with the head's dropout (``dropout``) the source of Monte-Carlo
    dropout votes."""

    backbone_dtype: str = choice("float32", BACKBONE_DTYPES)
    """VLM critic: the backbone's dtype (the head and the tie parameter stay float32)."""

    width: int = 64
    """Hidden size of the critic's transformer."""

    depth: int = 2
    """Transformer blocks of the critic (the policy's DiT block with a learned, time-free modulation)."""

    num_heads: int = 4
    """Attention heads (width / num_heads must be even and >= 6)."""

    patch_size: List[int] = field(default_factory=lambda: [1, 4, 4])
    """Patch size over (T, H, W); pt = 1 keeps one score per frame."""

    frame_differences: bool = False
    """Feed the clip's temporal differences x[t] - x[t-1] next to the clip (C more input channels), so every
    patch token sees the motion the oracle judges (``vidpo.models.critic``)."""

    dropout: float = 0.1
    """Dropout after every block and in the head (also the source of Monte-Carlo dropout votes)."""

    steps: int = 300
    """Optimizer steps of one critic training."""

    batch_size: int = 32
    """Pairs per critic step."""

    lr: float = 1.0e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""

    warmup_steps: int = 20
    """Linear warmup steps."""

    weight_decay: float = 0.01
    """AdamW weight decay."""

    segment_weight: float = 0.0
    """Weight of the per-segment Bradley-Terry term next to the whole-video term (useful when the labels
    differ per segment, i.e. DenseDPO-style labels)."""

    tie_init: float = -2.0
    """Initial log nu of the Davidson tie model; nu = 0 would be plain Bradley-Terry."""

    learn_ties: bool = True
    """Learn log nu from the labels' ties (otherwise it stays at tie_init)."""

    augment: bool = True
    """Train on label-preserving symmetries of the world: horizontal / vertical flips and time reversal,
    each with the caption's direction mapped accordingly (left <-> right, up <-> down, reversed)."""

    tie_margin: Optional[float] = None
    """Labelling: a score difference |d| <= tie_margin is a tie. None: the Davidson rule, tie where the tie
    is the most likely outcome, |d| < 2 max(log nu, 0)."""

    min_confidence: float = 0.0
    """Labelling: a pair (or segment) is a tie unless the critic's Davidson probability of its winner is at
    least this (0: no such rule). It trades labels for accuracy: on the shapes base, 0.85 ties ~40% of the
    pairs and lifts the agreement with the oracle of the rest from ~0.78 to ~0.88."""

    granularity: str = choice("video", Granularity)
    """Pairwise labels: 'segment' labels each segment from its own scores (whole-video label = their
    majority), 'video' gives one verdict from the whole-video scores copied to every segment."""

    pointwise: str = choice("quantile", PointwiseMode)
    """KTO labels from single-video scores: 'quantile' marks the top / bottom fractions of the scored set,
    'threshold' compares the scores with absolute values."""

    desirable: float = 0.7
    """Quantile mode: videos scoring at or above this quantile are desirable; threshold mode: the score."""

    undesirable: float = 0.3
    """Quantile mode: videos scoring at or below this quantile are undesirable; threshold mode: the score."""

    heldout_fraction: float = 0.2
    """``vidpo critic train`` without --heldout: the fraction of the labelled pairs held out to report
    accuracy on (``vidpo iterate`` measures on fresh oracle pairs instead and trains on all seed pairs)."""

    batch_size_eval: int = 128
    """Videos per forward pass when scoring."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "width", "depth", "num_heads")
        try:
            if not p:   # sizes in range: whether they make a network together
                self.dit()
        except ValueError as exc:
            p.add(f"{prefix}width / depth / num_heads / patch_size are not a valid critic network: {exc}",
                  "width", "depth", "num_heads", "patch_size")
        except TypeError:
            p.check(False, "patch_size", f"must be three sizes over (T, H, W), got {self.patch_size!r}")
        p.fraction(self, "dropout", "min_confidence", "heldout_fraction", "lora_dropout", high_open=True)
        p.at_least(self, 1, "steps", "batch_size", "batch_size_eval", "frames_per_segment", "lora_rank")
        p.check(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        p.check("{caption}" in self.instruction, "instruction", f"must contain {{caption}}, got {self.instruction!r}")
        p.check(bool(self.lora_targets) and all(isinstance(t, str) and t for t in self.lora_targets), "lora_targets",
                f"must be a non-empty list of module names, got {self.lora_targets!r}")
        p.at_least(self, 0, "lr", "warmup_steps", "weight_decay", "segment_weight")
        p.check(self.tie_margin is None or self.tie_margin >= 0, "tie_margin",
                f"must be >= 0 when set, got {self.tie_margin}")
        if self.pointwise == "quantile":
            p.check(0.0 <= self.undesirable < self.desirable <= 1.0, "desirable",
                    f"and {prefix}undesirable are quantiles: they need 0 <= undesirable < desirable <= 1, got "
                    f"desirable={self.desirable}, undesirable={self.undesirable}", "undesirable", "pointwise")
        else:
            p.check(self.undesirable < self.desirable, "desirable",
                    f"and {prefix}undesirable are score thresholds: they need undesirable < desirable, got "
                    f"desirable={self.desirable}, undesirable={self.undesirable}", "undesirable", "pointwise")
        return p

    def dit(self, cond_vocab_size: int = 1, attention: str = "sdpa") -> DiTConfig:
        """The critic's transformer shape as a ``DiTConfig`` (``vidpo.models.critic``); ValueError when the
        width, heads and patch size do not make one."""
        return DiTConfig(in_channels=3, patch_size=tuple(self.patch_size), width=self.width, depth=self.depth,
                         num_heads=self.num_heads, cond_vocab_size=cond_vocab_size, attention=attention)


@dataclass
class IterateConfig(Section):
    """Rounds of IPO (``vidpo iterate``): generate -> label with the critic -> train -> evaluate, and, for
    Dual-IPO, refine the critic between rounds on pseudo-labels filtered by the Preference Certainty
    Estimate (``vidpo.ipo.dual``)."""

    rounds: int = 3
    """Number of rounds R."""

    reference: str = choice("previous", IterateReference)
    """Reference model of round r: 'previous' = the policy round r starts from (round r-1's result),
    'base' = the initial policy in every round."""

    seed_pairs: int = 384
    """Pairs sampled from the initial policy and labelled by ``seed_labeler`` (on the shapes world the oracle, the
    stand-in for the paper's human labels) to train the first critic. No oracle label is used for training after
    these."""

    seed_labeler: str = choice("auto", SEED_LABELERS)
    """Who labels the seed pairs that train critic 0: 'oracle' (the shapes world's exact oracle), 'human' (a labels
    file, ``label.human_file``, exported from the pair viewer of DIR/seed/pairs) or 'vlm' (the VLM judge,
    ``label.vlm``); 'auto': the oracle on the shapes world, the recipe's ``label.labeler`` (human or vlm) on a
    prompt file."""

    seed_granularity: str = choice("video", Granularity)
    """Oracle labelling of the seed pairs (see label.granularity); the shapes world only."""

    seed_tie_margin: float = 0.01
    """Oracle score difference up to which a seed pair is labelled a tie (people call near-equal videos
    ties too; the critic's Bradley-Terry loss models them); the shapes world only."""

    eval_pairs: int = 192
    """Fresh pairs per round from the current policy, labelled by the oracle with no tie margin, to measure
    the critic's accuracy only (never trained on); the shapes world only (a prompt file has no oracle)."""

    pairing: str = choice("given", Pairing)
    """How a DPO round (flow_dpo / dense_dpo) gets its pairs from the critic: 'given' labels each generated
    pair as it is; 'ranked' scores all the round's videos and pairs each prompt's best-scored with its
    worst-scored (``rank_fraction``; ``vidpo.ipo.pairing.ranked_pairs``). KTO rounds always use pointwise labels."""

    round_labeler: str = choice("critic", RoundLabeler)
    """Who labels the rounds' pairs: 'critic' (IPO) or 'oracle' -- the ceiling a perfect critic would reach,
    an ablation for the report only (it trains on oracle labels, which the IPO recipe must not)."""

    rank_fraction: float = 0.25
    """'ranked' pairing: each prompt's top and bottom fractions of its videos by critic score are paired
    (every top video with every bottom one)."""

    margin_fraction: float = 1.0
    """'ranked' pairing: of all the round's best-versus-worst pairs, keep this fraction with the largest critic
    score gap (1: keep them all). The gap ranks pairs *across* prompts, so the prompts the critic cannot tell
    apart drop out (``vidpo.ipo.pairing.widest_pairs``). Measured on the shapes world: the widest half of a round-3
    pool agrees with the oracle ~97% against ~87% for the whole pool, yet the rounds gained no more, since the
    widest pairs have hopeless losers the policy already avoids (benchmarks/reports/2026-11-21_ipo_search_cpu.md);
    hence the default keeps all."""

    refine: bool = True
    """Dual-IPO: refine the critic between rounds (pseudo-labels, majority vote, PCE filter, weighted loss)."""

    refine_pairs: str = choice("generated", RefinePairs)
    """Which pairs of the round's videos the critic pseudo-labels: 'generated', the round's N generated pairs
    (as Dual-IPO does), or 'within_prompt', every pair of two videos of one prompt (~2N^2 / prompts pairs of the
    same 2N videos: each video is scored once per vote, so the votes cost the same; vidpo.ipo.dual). On the
    shapes world the generated pairs' few hundred pseudo-labels move the critic less than its retraining noise;
    within-prompt pairs (with refine_steps 1500) raise the critic's fresh-pair accuracy in round 2 on 7 of 7
    seeds (+0.0065) and round 3 of the policy by +0.004 (benchmarks/reports/2026-11-22_ipo_cpu.md)."""

    refine_steps: int = 0
    """AdamW steps of the refined critic's training; 0: critic.steps. Thousands of pseudo-labels need more
    steps than the seed labels alone, on which long training overfits."""

    votes: int = 5
    """Voting passes K per pseudo-label (critic passes, or sampled judgements of the served judge)."""

    vote_source: str = choice("critic", VoteSource)
    """Who votes on the pseudo-labels: 'critic' (K stochastic passes of the round's critic: Monte-Carlo dropout and
    views) or 'judge' (K sampled judgements of the VLM judge of ``label.vlm`` at ``vote_temperature``, each asked in
    both orders as the labeller does, with its own request seed so a server that honours ``seed`` repeats it and the
    answer cache keeps the passes apart): Dual-IPO's self-consistency from a chain-of-thought VLM."""

    vote_temperature: float = 0.7
    """Sampling temperature of the judge's voting passes (vote_source 'judge'); > 0, or every pass is the same."""

    vote_dropout: bool = True
    """Monte-Carlo dropout in the voting passes."""

    vote_augment: bool = True
    """Each voting pass sees a different label-preserving symmetry of the pair (flips, time reversal)."""

    vote_min_confidence: float = 0.0
    """A voting pass calls a tie unless its Davidson probability of the winner reaches this (see
    critic.min_confidence), so the majority vote keeps only pairs the critic is consistently sure of."""

    vote_keep_fraction: float = 0.0
    """With f > 0, each voting pass votes only on its fraction f of the pairs with the largest critic score gap
    (the rest are its ties), on top of vote_min_confidence: a critic trained longer is sharper, and a fixed
    confidence would let more of its votes through (benchmarks/reports/2026-11-22_ipo_cpu.md, 0d: at 0.5 round 3's
    pseudo-labels are right 0.89-0.95 instead of 0.82-0.87, and its refinement raises the critic's fresh-pair
    accuracy on 6 of 7 seeds; the policy gains no more than without it). 0: off."""

    pce_threshold: float = 0.5
    """Pseudo-labels are kept when PCE > this."""

    pce_timesteps: int = 4
    """(t, noise) draws averaged into the implicit reward of each video."""

    pce_temperature: float = 0.0
    """tau of the PCE (see vidpo.ipo.dual); 0: the standard deviation of the rewards over the dataset."""

    accumulate_pseudo: bool = True
    """Refinements train on the kept pseudo-labels of every earlier round, not only the latest."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "rounds", "votes", "pce_timesteps")
        p.at_least(self, 2, "seed_pairs", "eval_pairs")
        p.at_least(self, 0, "seed_tie_margin", "pce_temperature")
        p.check(0.0 < self.rank_fraction <= 0.5, "rank_fraction", f"must be in (0, 0.5], got {self.rank_fraction}")
        p.fraction(self, "margin_fraction", low_open=True)
        p.check(self.refine_steps >= 0, "refine_steps", f"must be >= 0 (0: critic.steps), got {self.refine_steps}")
        p.fraction(self, "vote_min_confidence", high_open=True)
        p.check(self.vote_temperature > 0, "vote_temperature",
                f"must be > 0 (K passes at temperature 0 are one judgement), got {self.vote_temperature}")
        p.check(0.0 <= self.vote_keep_fraction <= 1.0, "vote_keep_fraction",
                f"must be in [0, 1] (0: off), got {self.vote_keep_fraction}")
        p.fraction(self, "pce_threshold")
        return p
