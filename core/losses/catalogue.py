"""The loss catalogue: what each loss computes and what its reduction divides by, framework-neutral.

A loss as any framework computes it is described here by ``LossSemantics``:

    reduced = sum_e  s_e * m_e * L_e  /  D

- ``L_e`` the per-element loss (e runs over the examples, or the tokens of a
  (N, T, C) output; for the element-wise losses of PyTorch, over every
  entry), with class weights, positive weights and label smoothing inside;
- ``s_e`` the call-time sample weight (1 when none is passed);
- ``m_e`` the validity mask (0 where the target is the ignored class);
- ``D`` the divisor, one of ``DIVISORS``: a rule evaluated on each batch.

Every framework backend renders a ``LossSemantics`` as its own code, and the
numpy reference (``gradparity.reference.losses``) computes it in
float64, so a translation is checked by running it, not by reading it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Loss:
    """A loss function known to gradparity.

    ``target`` names the form of the targets: ``"class_index"`` (integer
    labels, last axis of the logits is the class axis), ``"probabilities"``
    (a distribution over the classes), ``"multi_label"`` (independent 0/1 or
    soft labels per class) or ``"values"`` (regression targets shaped like
    the predictions). ``options`` are the semantic options it accepts.
    """

    name: str
    summary: str
    target: str
    options: frozenset[str] = frozenset()


LOSSES: dict[str, Loss] = {
    l.name: l for l in (
        Loss("cross_entropy", "softmax cross-entropy of logits against integer class labels", "class_index",
             frozenset({"class_weight", "label_smoothing", "ignore_index"})),
        Loss("cross_entropy_probs", "softmax cross-entropy of logits against probability (or one-hot) targets",
             "probabilities", frozenset({"class_weight", "label_smoothing"})),
        Loss("binary_cross_entropy", "sigmoid binary cross-entropy of logits against per-class labels "
             "(multi-label)", "multi_label", frozenset({"class_weight", "pos_weight", "label_smoothing"})),
        Loss("mse", "squared error (z - t)^2", "values"),
        Loss("l1", "absolute error |z - t|", "values"),
        Loss("huber", "Huber: 0.5 d^2 for |d| <= delta, else delta (|d| - delta/2)", "values",
             frozenset({"delta"})),
    )
}

#: The divisor rules. Each is evaluated on the batch at hand, so a rule that
#: depends on the batch (valid tokens, a sum of weights) is never a constant.
DIVISORS: dict[str, str] = {
    "one": "1 (a plain sum)",
    "count": "the number of entries of the per-element loss (N, N*T, or N*T*C for element-wise losses)",
    "valid": "the number of valid (not ignored) elements",
    "class_weight_sum": "sum over valid elements of the class weight of their target, sum_e w[y_e] m_e "
                        "(PyTorch's weighted cross-entropy mean)",
    "sample_weight_sum": "sum of the sample weights over the valid elements, sum_e s_e m_e",
    "keras_sample_weight_sum": "sum of sample_weight as Keras holds it: (N, 1) weights on an (N, T) loss are "
                               "summed over N only (T times less than their broadcast sum), unless a mask "
                               "broadcast them to (N, T) (Keras rejects (N,) weights there)",
}

#: The divisor rules in a few words, for tables.
DIVISOR_LABELS: dict[str, str] = {
    "one": "1 (a sum)",
    "count": "number of elements",
    "valid": "number of valid elements",
    "class_weight_sum": "Σ w[y] over valid targets",
    "sample_weight_sum": "Σ sample weights of valid elements",
    "keras_sample_weight_sum": "Σ sample_weight as Keras holds it",
}

#: How an element-wise loss (BCE, MSE, L1, Huber) folds its last axis into one loss per element:
#: 'elementwise' keeps every entry (PyTorch), 'mean' averages it (Keras, which reduces the last axis first).
LAST_AXIS = ("elementwise", "mean")

#: Label smoothing of binary labels: Keras moves them to t(1 - eps) + eps/2; for classes, every framework
#: uses (1 - eps) t + eps / C.
BINARY_SMOOTHING = "t * (1 - eps) + eps / 2"


@dataclass(frozen=True)
class LossSemantics:
    """What one loss configuration computes (see the module doc for the formula)."""

    kind: str
    divisor: str
    class_weight: tuple[float, ...] | None = None
    pos_weight: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    ignore_index: int | None = None
    delta: float = 1.0
    last_axis: str = "elementwise"
    sample_weight: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("class_weight", "pos_weight"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @property
    def loss(self) -> Loss:
        return LOSSES[self.kind]

    @property
    def masked(self) -> bool:
        """Whether some elements may be ignored (class-index targets equal to ``ignore_index``)."""
        return self.kind == "cross_entropy" and self.ignore_index is not None

    def check(self) -> None:
        """ConfigError for a configuration no loss of the catalogue has (options the kind lacks, unknown rules).

        Parsers only produce valid ones; renderers call this so a hand-built one fails clearly.
        """
        from gradparity.errors import ConfigError

        if self.kind not in LOSSES:
            raise ConfigError(f"no loss {self.kind!r} (known: {', '.join(LOSSES)})")
        if self.divisor not in DIVISORS:
            raise ConfigError(f"unknown divisor rule {self.divisor!r} (known: {', '.join(DIVISORS)})")
        if self.last_axis not in LAST_AXIS:
            raise ConfigError(f"unknown last_axis {self.last_axis!r} (known: {', '.join(LAST_AXIS)})")
        used = {"class_weight": self.class_weight is not None, "pos_weight": self.pos_weight is not None,
                "label_smoothing": bool(self.label_smoothing), "ignore_index": self.ignore_index is not None}
        bad = [name for name, on in used.items() if on and name not in self.loss.options]
        if bad:
            raise ConfigError(f"{self.kind} takes no {', '.join(bad)}")
        if self.divisor == "class_weight_sum" and self.kind != "cross_entropy":
            raise ConfigError(f"divisor 'class_weight_sum' needs class-index targets; {self.kind} has none")

    def describe(self) -> str:
        """The configuration in words, e.g. 'cross_entropy, class weights [1, 2], ignore -100; ÷ valid'."""
        parts = [self.kind]
        if self.class_weight is not None:
            parts.append(f"class weights {list(self.class_weight)}")
        if self.pos_weight is not None:
            parts.append(f"pos_weight {list(self.pos_weight)}")
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.ignore_index is not None:
            parts.append(f"ignoring targets == {self.ignore_index}")
        if self.kind == "huber":
            parts.append(f"delta {self.delta:g}")
        if self.kind in ("binary_cross_entropy", "mse", "l1", "huber"):
            parts.append("last axis averaged per element" if self.last_axis == "mean" else "every entry an element")
        if self.sample_weight:
            parts.append("sample weights at the call")
        return ", ".join(parts) + f"; divided by {DIVISORS[self.divisor]}"


@dataclass(frozen=True)
class ParsedLoss:
    """A loss as a user wrote it in one framework, and what it means.

    ``framework`` is 'torch', 'keras' or 'jax'; ``source`` the text as given;
    ``arrays`` the named arrays the text referred to, resolved (e.g. a
    ``weight=class_weights`` whose values came from ``--data``).
    """

    framework: str
    source: str
    semantics: LossSemantics
    call_arguments: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LossCall:
    """What a loss's call passes per batch, as the user wrote it: positional argument count, keyword names."""

    n_args: int
    keywords: tuple[str, ...] = ()

    @property
    def sample_weight(self) -> bool:
        return "sample_weight" in self.keywords or self.n_args >= 3


@dataclass(frozen=True)
class Rendering:
    """One loss configuration written for one framework.

    ``native``: True when the framework's own loss object and reduction give
    the result with no hand-written arithmetic; ``code``: what a user pastes
    (constructor, call, and any explicit divisor), in terms of ``logits``,
    ``targets`` and ``sample_weight``; ``function``: a self-contained source
    (that framework and numpy only) defining ``loss_fn(logits, targets,
    sample_weight=None)``, which takes numpy arrays or that framework's
    tensors, channels-last logits, and returns the reduced scalar;
    ``notes``: what a user must know (divisors that change per batch,
    options with no native equivalent, layout changes).
    """

    framework: str
    native: bool
    code: str
    function: str
    notes: tuple[str, ...] = ()


def function_source(imports: tuple[str, ...], sem: LossSemantics, prologue: list[str], body: list[str]) -> str:
    """A rendering's self-contained ``loss_fn(logits, targets, sample_weight=None)`` source.

    ``prologue`` converts the inputs to the framework's tensors; ``body`` is
    the code a user pastes and must end by assigning ``loss``. The docstring
    says what the function computes.
    """
    doc = sem.describe().replace("\\", "\\\\").replace('"""', "'''")
    if not sem.sample_weight:
        doc += " (sample_weight is not used)"
    return "\n".join([*imports, "", "", "def loss_fn(logits, targets, sample_weight=None):", f'    """{doc}."""']
                     + [f"    {line}" for line in prologue + body] + ["    return loss", ""])
