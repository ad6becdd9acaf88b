"""Preference labellers: per-segment pair labels from the oracle, a VLM over HTTP, people, or a critic.

``build_labeler(kind, **options)`` builds one by kind ("oracle", "human", "vlm"; "critic" once the critic
module has registered itself with ``@register_labeler("critic")``); ``labeler.label(PairBatch)`` returns
a ``LabelResult`` of labels (B, S) in {+1, -1, 0}, their majority vote (B,), and the status of each label
(``ok``, ``tie``, ``unparseable``: a tie; ``failed``: no label, asked again by a rerun).
"""
from vidpo.labeling.base import (
                                 ERROR_POLICIES,
                                 KNOWN_KINDS,
                                 LABEL_STATUSES,
                                 STATUS_FAILED,
                                 STATUS_OK,
                                 STATUS_TIE,
                                 STATUS_UNPARSEABLE,
                                 Labeler,
                                 LabelingError,
                                 LabelResult,
                                 PairBatch,
                                 build_labeler,
                                 majority_vote,
                                 register_labeler,
                                 registered_kinds,
                                 status_counts,
)
from vidpo.labeling.human import HumanLabeler, HumanLabelFile, save_label_file
from vidpo.labeling.oracle_labeler import OracleLabeler
from vidpo.labeling.vlm import ServerUnreachable, VLMConfig, VLMLabeler, parse_answer

__all__ = [
    "ERROR_POLICIES", "KNOWN_KINDS", "LABEL_STATUSES", "STATUS_FAILED", "STATUS_OK", "STATUS_TIE",
    "STATUS_UNPARSEABLE", "status_counts", "LabelingError", "LabelResult", "Labeler", "PairBatch", "build_labeler",
    "majority_vote", "register_labeler", "registered_kinds", "HumanLabeler", "HumanLabelFile",
    "save_label_file", "OracleLabeler", "ServerUnreachable", "VLMConfig", "VLMLabeler", "parse_answer",
]
