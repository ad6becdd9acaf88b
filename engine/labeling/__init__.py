"""Preference labellers: per-segment pair labels from the oracle, a VLM over HTTP, people, or a critic.

``build_labeler(kind, **options)`` builds one by kind ("oracle", "human", "vlm"; "critic" once the critic
module has registered itself with ``@register_labeler("critic")``); ``labeler.label(PairBatch)`` returns
a ``LabelResult`` of labels (B, S) in {+1, -1, 0}, their majority vote (B,), and the failed comparisons.
"""
from vidpo.labeling.base import (
                                 ERROR_POLICIES,
                                 KNOWN_KINDS,
                                 Labeler,
                                 LabelingError,
                                 LabelResult,
                                 PairBatch,
                                 build_labeler,
                                 majority_vote,
                                 register_labeler,
                                 registered_kinds,
)
from vidpo.labeling.human import HumanLabeler, HumanLabelFile, save_label_file
from vidpo.labeling.oracle_labeler import OracleLabeler
from vidpo.labeling.vlm import VLMConfig, VLMLabeler, parse_answer

__all__ = [
    "ERROR_POLICIES", "KNOWN_KINDS", "LabelingError", "LabelResult", "Labeler", "PairBatch", "build_labeler",
    "majority_vote", "register_labeler", "registered_kinds", "HumanLabeler", "HumanLabelFile",
    "save_label_file", "OracleLabeler", "VLMConfig", "VLMLabeler", "parse_answer",
]
