"""The loss catalogue: what each loss means, independent of any framework.

A backend maps a loss name to its native loss object; core validates the
targets against ``Loss.target`` before any backend starts.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    """A loss function known to gradparity.

    ``target`` names the form of the targets: ``"class_index"`` means integer
    labels in ``[0, num_classes)`` compared with raw logits.
    """

    name: str
    summary: str
    target: str


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(
        "cross_entropy",
        "softmax cross-entropy of logits against integer class labels",
        "class_index",
    ),
}
