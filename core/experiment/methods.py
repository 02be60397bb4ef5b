"""The reduction methods: ways of getting one batch gradient (the seed question, generalized).

Every backend implements each method natively; core only knows what each
method computes and the factor that rescales its gradient to the common
convention, the gradient of the mean loss over the batch's examples.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One way of computing a batch gradient.

    ``sums_examples`` is True when the method's native gradient is the sum of
    per-example gradients (so it is rescaled by 1/N), False when the native
    reduction already averages over the batch.
    """

    name: str
    summary: str
    sums_examples: bool

    def normalization_factor(self, n_examples: int) -> float:
        """Factor that turns this method's native gradient into the mean-loss gradient."""
        return 1.0 / n_examples if self.sums_examples else 1.0

    def factor_label(self, n_examples: int) -> str:
        """The factor as a person writes it: '1/64' or '1'."""
        return f"1/{n_examples}" if self.sums_examples else "1"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "none_loop",
            'reduction "none", one backward per example (graph retained), gradients summed',
            True,
        ),
        Method(
            "none_vectorized",
            "per-example gradients in one vectorized call (vmap / vectorized_map), summed",
            True,
        ),
        Method("sum", 'reduction "sum", one backward', True),
        Method(
            "mean",
            'reduction "mean" (Keras: "sum_over_batch_size"), one backward',
            False,
        ),
        Method(
            "one_by_one",
            "each example fed alone, mean-reduced loss, one backward each, gradients summed",
            True,
        ),
    )
}
