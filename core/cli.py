"""Command line: ``gradparity run``, ``check``, ``diagnose``, ``translate``, ``compare-losses``, ``doctor``.

Exit codes (``gradparity.exit_codes``): 0 agree / match / clean; 1 disagree / mismatch / cause found; 2 invalid
input, nothing run (a bad flag is argparse's usage error, exit 2 too); 3 incomplete; 4 internal error; 128 + N
stopped by signal N, after writing a partial report of what finished.

Every parser rejects abbreviated flags (``--dtyp`` is not ``--dtype``) and answers an unknown flag or command
with the closest valid ones. Options shared by several commands are declared once, by the ``_add_*`` helpers
below; their defaults differ per command on purpose, and each help text states its command's default.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from gradparity.version import __version__
from gradparity.backends import FRAMEWORKS
from gradparity.errors import ConfigError, GradparityError, Interrupted
from gradparity.exit_codes import EXIT_INTERNAL, EXIT_INVALID
from gradparity.report.jsonout import dumps


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _overrides(args) -> dict:
    """CLI flags as dotted config keys; validated with the rest of the config."""
    o = {}
    for flag, key, conv in (("backends", "backends", _csv), ("methods", "methods", _csv),
                            ("dtype", "dtype", str), ("device", "device", str),
                            ("precision", "precision", str), ("seed", "seed", int),
                            ("batch_size", "data.batch_size", int), ("timeout", "timeout_s", float),
                            ("model", "model.kind", str), ("layer_defaults", "model.defaults", str),
                            ("data_parallel", "parallel.replicas", int)):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not isinstance(value, (str, int, float)):
            # argparse turns '--seed=--' into [] without calling the flag's type.
            raise ConfigError(f"--{flag.replace('_', '-')} needs a value, got {value!r}")
        o[key] = conv(value)
    return o


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (every parser and subparser), and with a "did you mean" for an unknown flag
    (``--backend`` -> ``--backends``, ``--dtyp=float64`` -> ``--dtype``) or command (``rnu`` -> ``run``): still
    argparse's usage error, exit 2, the suggestions taken from the chosen command's own flags."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(namespace)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser._suggest(extras)}")
        return namespace

    def _command_parser(self, namespace) -> argparse.ArgumentParser:
        """The subcommand's parser where one was chosen (its usage and flags), else this one."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(namespace, action.dest, None) if action.dest is not argparse.SUPPRESS else None
                return action.choices.get(chosen, self)
        return self

    def _suggest(self, extras: list[str]) -> str:
        """'; did you mean --backends?' for each unknown flag with a close valid one of this parser ('' if none)."""
        valid = sorted({o for a in self._actions for o in a.option_strings
                        if o.startswith("--") and a.help is not argparse.SUPPRESS})
        hints = []
        for token in extras:
            flag = token.split("=", 1)[0]
            if not flag.startswith("-") or flag in ("-", "--"):
                continue
            close = difflib.get_close_matches(flag, valid, n=3, cutoff=0.6)
            if close:
                hints.append((flag, " or ".join(close)))
        if len(hints) == 1:
            return f"; did you mean {hints[0][1]}?"
        return "".join(f"; {flag}: did you mean {close}?" for flag, close in hints)

    def _get_values(self, action, arg_strings):
        """``--dtype=--`` (or ``--dtype --`` last): argparse (3.11) would hand the flag [] without calling its
        type or action's checks; it is a missing value, a usage error (exit 2) like ``--dtype`` alone."""
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "expected one argument")
        return super()._get_values(action, arg_strings)

    def _check_value(self, action, value):
        """An invalid choice (a command, a fixed-choice flag) names the closest valid ones."""
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=3, cutoff=0.6)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}; did you mean {' or '.join(map(repr, close))}?") \
                from None


# --- options shared by several commands: each declared here once, with one help text -----------------------
# The defaults differ per command on purpose (a loss translation runs longer than a probe); every helper states
# the command's default in the help. A None default leaves the value to the command's config file.

class _Seconds(argparse.Action):
    """``--timeout``: a positive, finite number of seconds, at most a week; anything else is a usage error
    (exit 2) for every command, before any work."""

    def __call__(self, parser, namespace, values, option_string=None):
        from gradparity.experiment.spec import MAX_TIMEOUT_S

        # argparse hands '--timeout=--' over as [] without calling float().
        if not isinstance(values, float) or not (math.isfinite(values) and 0 < values <= MAX_TIMEOUT_S):
            got = repr(values) if isinstance(values, float) else "no number"
            raise argparse.ArgumentError(
                self, f"must be a positive number of seconds, at most {MAX_TIMEOUT_S:g} (a week), got {got}")
        setattr(namespace, self.dest, values)


def _default(default, text: str | None) -> str:
    """'(default: X)' for a help text: ``text`` where the value comes from elsewhere (a config), else the value."""
    return f"(default: {text if text is not None else f'{default:g}' if isinstance(default, float) else default})"


def _add_timeout(parser, default: float | None, *, worker: str = "framework worker",
                 default_text: str | None = None) -> None:
    parser.add_argument("--timeout", type=float, action=_Seconds, default=default, metavar="S",
                        help=f"seconds per {worker}, a positive number {_default(default, default_text)}")


def _add_json(parser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as JSON instead of the text (strict JSON: NaN and inf are null)")


def _add_dtype(parser, default: str | None, *, choices: str = "float32 | float64", note: str = "",
               default_text: str | None = None) -> None:
    parser.add_argument("--dtype", default=default,
                        help=f"{choices}: what the frameworks compute in{note} {_default(default, default_text)}")


def _add_backends(parser, default: str | None, choices: str, *, default_text: str | None = None) -> None:
    parser.add_argument("--backends", default=default,
                        help=f"comma-separated: {choices} {_default(default, default_text)}")


class _Seed(argparse.Action):
    """``--seed``: a whole number >= 0 (numpy's generators take no negative seed); anything else is a usage error
    (exit 2) for every command, before any work."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not isinstance(values, int) or values < 0:
            raise argparse.ArgumentError(self, f"must be a whole number >= 0, got {values!r}")
        setattr(namespace, self.dest, values)


def _add_seed(parser, default: int | None, *, default_text: str | None = None) -> None:
    parser.add_argument("--seed", type=int, action=_Seed, default=default,
                        help="the random seed of everything generated (data, parameters, gradient sequences) "
                             + _default(default, default_text))


def _add_out(parser, default: str, writes: str) -> None:
    parser.add_argument("--out", default=default, help=f"output folder: {writes} (default: ./{default})")


def _add_keras_backend(parser, default: str | None = "tensorflow", *, default_text: str | None = None) -> None:
    from gradparity.backends import KERAS_VARIANTS

    parser.add_argument("--keras-backend", default=default,
                        help=f"{' | '.join(KERAS_VARIANTS)}: the backend Keras runs on "
                             + _default(default, default_text))


def _add_device(parser, default: str | None, *, choices: str = "auto | cpu | gpu",
                default_text: str | None = None) -> None:
    parser.add_argument("--device", default=default, help=f"{choices} {_default(default, default_text)}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gradparity", allow_abbrev=False,
        description="Compare batch gradients across loss reductions and frameworks, normalized.")
    p.add_argument("--version", action="version", version=f"gradparity {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a reduction experiment and write its report",
                         description="Run a reduction experiment (the embedded default when no CONFIG "
                                     "is given) and write report.json, report.md, inputs.npz and "
                                     "gradients.npz.")
    run.add_argument("config", nargs="?", help="experiment TOML, merged over the embedded default")
    _add_backends(run, None, "numpy,torch,keras,jax (keras-tensorflow, keras-jax, keras-torch)",
                  default_text="the experiment's backends; embedded: numpy,torch,keras,jax")
    run.add_argument("--methods", help="comma-separated: none_loop,none_vectorized,sum,mean,one_by_one")
    _add_dtype(run, None, default_text="the experiment's dtype; embedded: float32")
    _add_device(run, None, default_text="the experiment's device; embedded: auto")
    run.add_argument("--precision", help="highest (no TF32) | default (framework defaults)")
    run.add_argument("--model", help="mlp (default) | cnn | sequence: the built-in model ([model] kind)")
    run.add_argument("--layer-defaults", help="explicit (default): the same layer settings in every framework | "
                     "framework: each framework's own defaults (LayerNorm epsilon, GELU form, padding), "
                     "for a CNN or sequence model")
    _add_seed(run, None, default_text="the experiment's seed; embedded: 0")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--data-parallel", type=int, metavar="R",
                     help="also run every framework's own data-parallel engines on R replicas of this machine "
                          "(torch DDP/FSDP2 over gloo, tf.distribute MirroredStrategy, JAX sharding) and report "
                          "each reduction's factor against the single-device gradient ([parallel] replicas)")
    _add_timeout(run, None, worker="backend worker", default_text="the experiment's timeout_s; embedded: 600")
    _add_out(run, "gradparity-out", "report.json, report.md, report.html, its plots, inputs.npz, gradients.npz")
    run.add_argument("--check", action="store_true",
                     help="validate the experiment and its data, print it, run nothing")
    run.add_argument("--quiet", action="store_true", help="print only the verdict")
    doc = sub.add_parser("doctor", help="show installed frameworks and versions per backend (--devices: and the "
                                        "device each would use)",
                         description="List every backend with whether its modules are installed, their versions "
                                     "and the pip extra that installs a missing one, without importing any "
                                     "framework (seconds). --devices (or --device gpu) also opens a session in "
                                     "each backend's worker, as a run would, and reports the device it picks.")
    doc.add_argument("--devices", action="store_true",
                     help="also start each backend's worker to report its device and TF32 (imports every "
                          "framework: a minute or more)")
    _add_device(doc, "auto", default_text="auto; gpu implies --devices")
    sub.add_parser("default-config", help="print the embedded default experiment (TOML)")
    tr = sub.add_parser("translate", help="render a loss or an optimizer for the other frameworks and check it "
                                          "by running it",
                        description="Read a loss as written in one framework (constructor, optionally with its "
                                    "call), print the code computing the same loss in the others, run the source "
                                    "and every translation on generated batches (and --data) in each framework, "
                                    "and compare loss and d loss / d logits with a float64 reference. Given an "
                                    "optimizer (torch.optim.Adam(params, lr=1e-3), keras.optimizers.SGD(...), "
                                    "optax.adamw(...)), print the configuration in the others that reproduces its "
                                    "trajectory (or the explicit code where no argument does), run the source, each "
                                    "translation and the naive port on fixed gradient sequences, and compare "
                                    "their parameters with the source's at every step.")
    tr.add_argument("loss", nargs="?", help='e.g. "torch.nn.CrossEntropyLoss(label_smoothing=0.1)" or '
                                            '"torch.optim.Adam(params, lr=1e-3)"')
    tr.add_argument("--steps", type=int, default=20, help="for an optimizer: steps per gradient sequence (default 20)")
    tr.add_argument("--config", help="a TOML file with one [[losses]] table: the structured form of the text")
    tr.add_argument("--to", default="torch,keras,jax", help="comma-separated targets (default: torch,keras,jax)")
    tr.add_argument("--data", help="an .npz with named arrays the text refers to, and/or a batch "
                                   "('logits', 'targets', optional 'sample_weight')")
    tr.add_argument("--targets", help="class_index | probabilities: what torch's CrossEntropyLoss is given "
                                      "(default class_index)")
    _add_keras_backend(tr)
    _add_seed(tr, 0)
    _add_dtype(tr, "float64", choices="float64 | float32", note="; the reference is float64 on the same rounded "
                                                               "batches")
    _add_timeout(tr, 600.0)
    _add_json(tr, "the report")
    cl = sub.add_parser("compare-losses", help="run several loss configurations on the same batches and say "
                                               "which are equal, a constant factor apart, or a batch-dependent one",
                        description="Run each loss configuration (as written in PyTorch, Keras or JAX code) "
                                    "natively on the same generated batches, check each against gradparity's "
                                    "float64 reading of it, and classify every pair: equal, constant factor (a "
                                    "learning-rate constant), batch-dependent factor, or not equivalent.")
    cl.add_argument("losses", nargs="*", help="two or more loss texts (with --config: any number)")
    cl.add_argument("--config", help="a TOML file of [[losses]] tables (the structured form), after the texts")
    cl.add_argument("--targets", help="class_index | probabilities (for torch's CrossEntropyLoss)")
    _add_keras_backend(cl)
    _add_seed(cl, 0)
    _add_timeout(cl, 600.0)
    _add_json(cl, "the report")
    dg = sub.add_parser("diagnose", help="why do these gradients differ? rank known causes against the numbers",
                        description="Read a gradparity report folder, an .npz of gradients keyed METHOD/PARAM, or a "
                                    "table of pairwise max |a - b| (CSV a,b,max_abs, JSON rows, or lines like "
                                    "'Maximum discrepancy between reduction = none and sum: 0.0316'; '-' reads "
                                    "stdin), test every known cause against the pattern, and rank them with "
                                    "evidence and a fix.")
    dg.add_argument("source", help="report folder | gradients .npz | table file | -")
    dg.add_argument("--info", help="a TOML of what you know: batch_size, dataset_size, dtype, micro_batches, "
                                   "replicas, padding, dropout, batchnorm, loss_reduction, grad_scale (flags "
                                   "override it)")
    for flag in ("--batch-size", "--dataset-size", "--micro-batches", "--replicas"):
        dg.add_argument(flag, type=int)
    dg.add_argument("--padding", type=int, help="how many of the batch's items (tokens) are padding, ignored by "
                                                "the loss")
    dg.add_argument("--grad-scale", type=float, help="the gradients' largest |entry|: the scale a table of absolute "
                                                     "differences is judged at (default: assumed 1, and said)")
    dg.add_argument("--dtype", help="float64 | float32 | tf32 | float16 | bfloat16: what the gradients were "
                                    "computed in")
    dg.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=None)
    dg.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=None)
    dg.add_argument("--loss-reduction", help="how the loss was reduced, in words (e.g. 'class-weighted mean')")
    dg.add_argument("--methods", metavar="LABEL=METHOD,...",
                    help="how to read your labels: each label and the method it is, of none_loop, one_by_one, "
                         "none_vectorized, sum, mean (and their synonyms: gradparity diagnose says which it read)")
    _add_json(dg, 'the causes ({"causes": [{"id", "score", "evidence", "fix"}], ...})')
    ck = sub.add_parser("check", help="your own model in torch / Keras / TF-Keras / Flax: same weights, same batch; "
                                      "do loss and gradients agree, and where do they part?",
                        description="Build each framework's model from its factory ('module:function', importable "
                                    "from the current folder, called with no arguments), map the weights of one "
                                    "(--weights FRAMEWORK) onto the others by structure, or keep each model's own "
                                    "and check the conversion by value (--weights own), run every reduction "
                                    "method on the same batch, compare, and name the first layer where a port "
                                    "differs (a layer-by-layer capture, run when the gradients disagree).")
    ck.add_argument("config", nargs="?", help="a TOML file: [models] torch/keras/tf_keras/jax = 'module:function', "
                                              "[check] keys, [mapping.FRAMEWORK] names (flags override it)")
    for fw in FRAMEWORKS:
        ck.add_argument(f"--{fw}", metavar="MODULE:FUNCTION", help=f"the {fw} model's factory")
    ck.add_argument("--tf-keras", metavar="MODULE:FUNCTION", help="the TF-Keras 2 (tf_keras) model's factory")
    ck.add_argument("--data", help="an .npz with arrays 'x' (images channels-last) and 'y', or the arrays --inputs "
                                   "and --targets name")
    ck.add_argument("--inputs", metavar="ARG=ARRAY,...", help="call the model with keyword arguments: each call "
                                                              "argument and the npz array it takes")
    ck.add_argument("--targets", metavar="ARRAY", help="the npz array the loss compares with (default y)")
    ck.add_argument("--output", metavar="PATH", help="the tensor the loss reads in the model's output: a key, "
                                                     "attribute or index path (default: the output, or its logits)")
    ck.add_argument("--loss", help="cross_entropy (default) | mse | causal_lm")
    ck.add_argument("--weights", help="own (each factory loads its weights; paired by value, the conversion checked)"
                                      " | the framework whose weights the others take (default: the first of torch, "
                                      "keras, tf_keras, jax given)")
    ck.add_argument("--weights-from", help=argparse.SUPPRESS)
    ck.add_argument("--localize", help="auto (default: capture activations in a second pass when the gradients "
                                       "disagree) | always")
    ck.add_argument("--methods", help="comma-separated, of mean,sum,none_loop,none_vectorized,one_by_one "
                                      "(default: mean,sum,none_loop,one_by_one)")
    _add_dtype(ck, None, default_text="the config's dtype, else float32")
    ck.add_argument("--mode", help="inference (default) | training")
    _add_device(ck, None, choices="cpu | auto | gpu", default_text="the config's device, else cpu")
    ck.add_argument("--precision", help="highest (default) | default")
    _add_keras_backend(ck, None, default_text="the config's keras_backend, else tensorflow")
    _add_timeout(ck, None, default_text="the config's timeout_s, else 300")
    ck.add_argument("--train-steps", type=int, help="then train every port this many steps on the batch from the "
                                                    "mapped weights and compare the trajectories (default 0: no)")
    ck.add_argument("--train-optimizer", help="sgd (default) | momentum, with --train-steps")
    ck.add_argument("--train-lr", type=float, help="learning rate with --train-steps (default 0.01)")
    _add_out(ck, "gradparity-check", "report.json, report.md, inputs.npz, gradients.npz")
    _add_json(ck, "report.json's document")
    tb = sub.add_parser("loss-table", help="measure common loss configurations in every framework "
                                           "(the README's equivalence table)")
    _add_keras_backend(tb)
    _add_timeout(tb, 900.0)
    op = sub.add_parser("optimizers", help="SGD, momentum, Adam, AdamW in torch, Keras and optax on one fixed "
                                           "gradient sequence: does each do what its source says, and where "
                                           "do they part?")
    _add_backends(op, "torch,keras-tensorflow,jax", "torch, keras-tensorflow, keras-jax, keras-torch, jax")
    op.add_argument("--scenarios", help="comma-separated scenario ids (default: all; see the README)")
    _add_dtype(op, "float64", choices="float64 | float32")
    op.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    _add_seed(op, 0)
    _add_timeout(op, 600.0)
    _add_json(op, "the measurements")
    trn = sub.add_parser("train", help="train the built-in MLP for K steps in every framework from one start: "
                                       "does each follow its optimizer's exact trajectory, and where do they part?")
    trn.add_argument("--model", default="mlp", help="mlp (default) | cnn | sequence: the built-in model trained "
                                                    "(cnn: the digits as 8x8x1 images; sequence: token sequences); "
                                                    "or CHECK.toml: the models of a gradparity check config, in its "
                                                    "frameworks, from its source's weights (with --sweep)")
    trn.add_argument("--data", help="with --model CHECK.toml: an .npz of examples (the check's array names) to "
                                    "train on and hold out from, instead of the check's batch")
    trn.add_argument("--optimizer", default="momentum",
                     help="sgd | momentum (default) | nesterov | adam | adamw, or an optimizer as written in one "
                          "framework, e.g. \"keras.optimizers.Adam(learning_rate=1e-2)\": its framework trains with "
                          "it, the others with its translation (gradparity translate)")
    trn.add_argument("--lr", type=float, help="learning rate (default: sgd 0.1, momentum 0.05, adam 1e-2)")
    trn.add_argument("--steps", type=int, default=30)
    trn.add_argument("--batch-size", type=int, default=32)
    trn.add_argument("--reduction", default="mean", help="mean (default; Keras sum_over_batch_size) | sum")
    trn.add_argument("--schedule", default="constant", help="constant (default) | step (lr halved halfway)")
    _add_dtype(trn, "float32")
    _add_backends(trn, "torch,keras-tensorflow,jax", "torch, keras-tensorflow, keras-jax, keras-torch, jax")
    _add_seed(trn, 0)
    _add_timeout(trn, 600.0)
    trn.add_argument("--equivalence", action="store_true",
                     help="also train with the other reduction at the lr that should give identical updates "
                          "(sum at lr/B for SGD, the same lr for Adam) and report how far apart they are")
    trn.add_argument("--data-parallel", type=int, metavar="R",
                     help="train on every framework's own data-parallel engines with R replicas of this machine "
                          "(the global batch --batch-size split R ways) against single-device training, step by "
                          "step")
    trn.add_argument("--sweep", action="store_true",
                     help="sweep batch sizes x learning-rate rules (mean at lr0, mean at lr0*B/32, sum at lr0/32; "
                          "Adam also sqrt scaling) for --epochs, every framework, and print the learning-rate recipe")
    trn.add_argument("--batch-sizes", default="16,32,64,128", help="with --sweep (default 16,32,64,128)")
    trn.add_argument("--epochs", type=int, default=3, help="with --sweep: epochs per batch size (default 3)")
    trn.add_argument("--class-weights", default="none",
                     help="with --sweep: none (default) | balanced (n / (10 n_k)) | skewed (seeded, 1/4 to 4): "
                          "per-example weights w = c[y]; the rules use the weighted mean sum(w l)/sum(w), the "
                          "weighted sum, and Keras' sum_over_batch_size sum(w l)/N ('sobs')")
    trn.add_argument("--seeds", help="with --sweep: comma-separated seeds, e.g. 0,1,2: the sweep once per seed "
                                     "(parameters, held-out split, data order), accuracies as mean ± std")
    trn.add_argument("--last-batch", default="drop",
                     help="with --sweep: drop (default) | keep: each epoch ends with the short batch of n mod B "
                          "examples (the rules also run with it dropped, to compare)")
    trn.add_argument("--lr-grid", nargs="?", const="default", default=None,
                     help="with --sweep: also run each rule at its lr times each of these comma-separated "
                          "multipliers (without a value: 0.25,0.5,1,2,4) and report the best measured lr per batch "
                          "size and reduction against the rules' predictions")
    _add_out(trn, "gradparity-train", "report.html (curves), report.json, report.md, PNGs, npz")
    _add_json(trn, "the measurements")
    bm = sub.add_parser("benchmark", help="time the default training sweep: wall time, and time per step per "
                                          "framework; or (--verdict) the default run against its floor "
                                          "(a measurement, not a test)")
    bm.add_argument("--verdict", action="store_true",
                    help="time the default `gradparity run` against its floor (one fresh process importing torch, "
                         "TensorFlow+Keras and JAX+Flax and computing one gradient of the default MLP in each), "
                         "alternately, --repeat pairs; report the medians and their ratio")
    bm.add_argument("--repeat", type=int, default=3, help="with --verdict: pairs of runs (default: 3)")
    bm.add_argument("--optimizer", default="momentum", help="sgd | momentum (default) | nesterov | adam | adamw")
    bm.add_argument("--batch-sizes", default="16,32,64,128")
    bm.add_argument("--epochs", type=int, default=3)
    _add_dtype(bm, "float32")
    _add_backends(bm, "torch,keras-tensorflow,jax", "torch, keras-tensorflow, keras-jax, keras-torch, jax")
    _add_timeout(bm, 600.0)
    _add_json(bm, "the benchmark")
    return p


def _benchmark(args) -> int:
    from gradparity.commands import sweep
    from gradparity.commands.train import TrainSpec

    if args.verdict:
        from gradparity.commands import benchmark

        if not 1 <= args.repeat <= 50:
            raise ConfigError(f"--repeat must be in 1..50, got {args.repeat}")
        floor, run = benchmark.time_to_verdict(args.repeat, args.timeout,
                                               lambda msg: print(msg, file=sys.stderr, flush=True))
        print(dumps(benchmark.to_dict(floor, run)) if args.json else benchmark.render(floor, run))
        return 0 if set(floor.codes) == set(run.codes) == {0} else 3

    try:
        sizes = tuple(int(v) for v in _csv(args.batch_sizes))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    spec = TrainSpec(optimizer=args.optimizer, dtype=args.dtype, backends=tuple(_csv(args.backends)),
                     timeout_s=args.timeout)
    result = sweep.run_sweep(sweep.SweepSpec(spec, sizes, args.epochs, parallel=1),
                             progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(dumps(sweep.to_dict(result)["benchmark"]))
    else:
        print("\n".join(sweep.timing_lines(result)))
    return result.exit_code


def _train_parallel(args, spec) -> int:
    """``train --data-parallel R``: commands.train_parallel, its report into --out."""
    from gradparity.commands import train_parallel as tp
    from gradparity.report.outdir import OutputDir, new_run_id

    if args.sweep:
        raise ConfigError("--data-parallel trains step by step against one device; it does not combine with --sweep")
    tp.check(spec, args.data_parallel)  # exit 2 before the output folder or any process
    run_id = new_run_id()
    folder = OutputDir.claim(args.out, run_id, ("report.json", "report.md"))
    try:
        report = tp.run_parallel_training(spec, args.data_parallel,
                                          progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        tp.write_report(report, folder, run_id)
    finally:
        folder.release()
    print(dumps(tp.to_dict(report)) if args.json else "\n".join(tp.render_lines(report)))
    if not args.json:
        print(f"\nwrote {Path(args.out) / 'report.json'}, report.md (run {run_id})")
    return report.exit_code


def _train(args) -> int:
    from gradparity.commands.train import TrainSpec, render_text, run_training, to_dict
    from gradparity.commands.user_models import NOT_WITHOUT_SWEEP

    spec = TrainSpec(optimizer=args.optimizer, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                     reduction=args.reduction, schedule=args.schedule, dtype=args.dtype, seed=args.seed,
                     backends=tuple(_csv(args.backends)), timeout_s=args.timeout, equivalence=args.equivalence,
                     model=args.model, data=args.data)
    if args.sweep and args.model not in ("mlp",) and not args.model.endswith(".toml"):
        raise ConfigError(f"--sweep trains the built-in MLP or a check config's models (--model CHECK.toml), not "
                          f"--model {args.model}")
    if args.model.endswith(".toml") and not args.sweep:
        raise ConfigError(NOT_WITHOUT_SWEEP)
    if args.data_parallel is not None:
        return _train_parallel(args, spec)
    sweep_only = [flag for flag, value, default in (("--class-weights", args.class_weights, "none"),
                                                    ("--last-batch", args.last_batch, "drop"),
                                                    ("--lr-grid", args.lr_grid, None),
                                                    ("--seeds", args.seeds, None)) if value != default]
    if sweep_only and not args.sweep:
        raise ConfigError(f"{', '.join(sweep_only)} only with --sweep")
    if args.sweep:
        from gradparity.commands import sweep

        try:
            sizes = tuple(int(v) for v in _csv(args.batch_sizes))
        except ValueError:
            raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
        try:
            grid = (sweep.DEFAULT_GRID if args.lr_grid == "default" else
                    tuple(float(v) for v in _csv(args.lr_grid)) if args.lr_grid is not None else ())
        except ValueError:
            raise ConfigError(f"--lr-grid must be comma-separated numbers, got {args.lr_grid!r}") from None
        if args.lr_grid is not None and not grid:
            raise ConfigError(f"--lr-grid needs at least one multiplier, got {args.lr_grid!r}")
        from gradparity.report.outdir import OutputDir, new_run_id
        from gradparity.commands.train_report import SWEEP_FILES, write_sweep_report

        try:
            seeds = tuple(int(v) for v in _csv(args.seeds)) if args.seeds is not None else ()
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        sweep_spec = sweep.SweepSpec(spec, sizes, args.epochs, args.class_weights, args.last_batch, grid, seeds)
        sweep.check_sweep(sweep_spec)  # bad values are exit 2 before the output folder or any worker
        run_id = new_run_id()
        folder = OutputDir.claim(args.out, run_id, SWEEP_FILES)
        try:
            result = sweep.run_sweep(sweep_spec, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
            write_sweep_report(result, folder, run_id)
        finally:
            folder.release()
        print(dumps(sweep.to_dict(result)) if args.json else sweep.render_text(result))
        if not args.json:
            plots = ", ".join(["recipe.png", "epochs.png"] + (["grid.png"] if grid else [])
                              + (["weights.png"] if sweep_spec.weighted else []))
            print(f"\nwrote {Path(args.out) / 'report.html'} (open it in any browser), report.json, report.md, "
                  f"{plots} (run {run_id})")
        return result.exit_code

    from gradparity.commands.train import check_spec
    from gradparity.report.outdir import new_run_id
    from gradparity.commands.train_report import claim, write_train_report

    check_spec(spec)
    run_id = new_run_id()
    folder = claim(args.out, run_id)
    try:
        report = run_training(spec, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        write_train_report(report, folder, run_id)
    finally:
        folder.release()
    print(dumps(to_dict(report)) if args.json else render_text(report))
    if not args.json:
        print(f"\nwrote {Path(args.out) / 'report.html'} (open it in any browser), report.json, report.md, "
              f"loss.png, drift.png, inputs.npz, trajectories.npz (run {run_id})")
    return report.exit_code


def _finished(call):
    """(the command's result, None), or (the partial result an interruption carries, the ``Interrupted``): the
    commands that print their report print what finished, then exit 128 + N."""
    try:
        return call(), None
    except Interrupted as exc:
        if exc.report is None:
            raise
        print(f"gradparity: interrupted by {exc.signal_name}; the report below covers what finished (the rest "
              "says 'interrupted')", file=sys.stderr, flush=True)
        return exc.report, exc


def _optimizers(args) -> int:
    from gradparity.commands.optimizers import BY_ID, SCENARIOS, compare_optimizers, render_text, to_dict

    if args.dtype not in ("float32", "float64"):
        raise ConfigError(f"--dtype must be float32 or float64, got {args.dtype!r}")
    scenarios = SCENARIOS
    if args.scenarios:
        unknown = [s for s in _csv(args.scenarios) if s not in BY_ID]
        if unknown:
            raise ConfigError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_ID)}")
        scenarios = tuple(BY_ID[s] for s in _csv(args.scenarios))
        if not scenarios:
            raise ConfigError(f"--scenarios {args.scenarios!r} names no scenario; known: {', '.join(BY_ID)}")
    results, stopped = _finished(lambda: compare_optimizers(
        scenarios, tuple(_csv(args.backends)), args.dtype, args.steps, args.seed, args.timeout,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True)))
    print(dumps(to_dict(results, args.dtype, args.steps)) if args.json
          else render_text(results, args.dtype, args.steps))
    if stopped is not None:
        return stopped.exit_code
    if any(r.errors for r in results):
        return 3
    return 1 if any(e > r.semantics_rtol[b] for r in results for b, e in r.semantics.items()) else 0


def _run(args) -> int:
    from gradparity.experiment.inputs import build_inputs
    from gradparity.experiment.spec import load_experiment
    from gradparity.report.render import render_text
    from gradparity.commands.run import run_experiment

    exp = load_experiment(args.config, _overrides(args))
    if args.check:
        inputs = build_inputs(exp)
        if exp.parallel.on:  # what run checks before any replica starts
            from gradparity.experiment.parallel import preflight
            from gradparity.run.runner import available_memory_bytes

            preflight(exp.parallel, available_memory_bytes())
        print(f"valid: {exp.name!r}: {inputs.model.describe()}, {inputs.data_description}; "
              f"backends {', '.join(exp.backends)}; methods {', '.join(exp.methods)}; "
              f"{exp.dtype}, device {exp.device}, precision {exp.precision}"
              + (f"; discrepancy switches on: {', '.join(exp.causes.on())}" if exp.causes.on() else "")
              + (f"; data-parallel on {exp.parallel.replicas} replicas: {', '.join(exp.parallel.backends)}"
                 if exp.parallel.on else ""))
        return 0
    say = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(args.out)
    try:
        report = run_experiment(exp, out, progress=say)
    except Interrupted as exc:
        if exc.report is None:
            print(f"gradparity: interrupted by {exc.signal_name} before any backend ran; nothing was written",
                  file=sys.stderr)
            return exc.exit_code
        report = exc.report
    if args.quiet:
        print(report.verdict.summary)
    else:
        print(render_text(report))
        print(f"\nwrote {out / 'report.json'}, report.md, inputs.npz, gradients.npz (run {report.run_id})")
        print(f"open {out / 'report.html'} in a browser for the plots (heatmap.png, max_rel.png beside it)")
    return report.verdict.exit_code


def _loss_texts(args) -> list[str]:
    """The loss texts given on the command line, then those of --config's [[losses]] tables."""
    from gradparity.losses.config import read_loss_file

    given = args.losses if hasattr(args, "losses") else [args.loss] if args.loss is not None else []
    return list(given) + (read_loss_file(args.config) if args.config else [])


def _translate(args) -> int:
    from gradparity.backends import KERAS_VARIANTS
    from gradparity.commands.translate import render_text, translate

    if args.keras_backend not in KERAS_VARIANTS:
        raise ConfigError(f"--keras-backend must be one of {', '.join(KERAS_VARIANTS)}, got {args.keras_backend!r}")
    texts = _loss_texts(args)
    if len(texts) == 1 and args.config is None:
        from gradparity.experiment.optimizer_text import framework_of

        if framework_of(texts[0]) is not None:
            return _translate_optimizer(args, texts[0])
    if len(texts) != 1:
        raise ConfigError(f"translate takes one loss: a text or a --config file with one [[losses]] table, "
                          f"got {len(texts)}")
    say = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report, stopped = _finished(lambda: translate(texts[0], tuple(_csv(args.to)), args.data, args.targets,
                                                      args.seed, args.keras_backend, args.timeout, progress=say,
                                                      dtype=args.dtype))
    except ConfigError as exc:
        exc.subject = "loss or data"
        raise
    if args.json:
        print(dumps(report.to_dict()))
    else:
        print(render_text(report))
    return stopped.exit_code if stopped is not None else report.exit_code


def _translate_optimizer(args, text: str) -> int:
    from gradparity.commands.translate_optimizer import render_text, translate_optimizer

    for flag, value in (("--data", args.data), ("--targets", args.targets)):
        if value is not None:
            raise ConfigError(f"{flag} is for a loss; an optimizer is measured on fixed gradient sequences")
    say = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report, stopped = _finished(lambda: translate_optimizer(text, tuple(_csv(args.to)), args.dtype, args.steps,
                                                                args.seed, args.keras_backend, args.timeout,
                                                                progress=say))
    except ConfigError as exc:
        exc.subject = "optimizer"
        raise
    print(dumps(report.to_dict()) if args.json else render_text(report))
    return stopped.exit_code if stopped is not None else report.exit_code


def _compare_losses(args) -> int:
    from gradparity.backends import KERAS_VARIANTS
    from gradparity.commands.compare_losses import compare_losses, render_text

    if args.keras_backend not in KERAS_VARIANTS:
        raise ConfigError(f"--keras-backend must be one of {', '.join(KERAS_VARIANTS)}, got {args.keras_backend!r}")
    say = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report, stopped = _finished(lambda: compare_losses(_loss_texts(args), args.seed, args.targets,
                                                           args.keras_backend, args.timeout, say))
    except ConfigError as exc:
        exc.subject = "loss configurations"
        raise
    print(dumps(report.to_dict()) if args.json else render_text(report))
    return stopped.exit_code if stopped is not None else report.exit_code


def _diagnose(args) -> int:
    from gradparity.commands import diagnose as dg
    flags = {k: getattr(args, k) for k in ("batch_size", "dataset_size", "micro_batches", "replicas", "padding",
                                          "dtype", "dropout", "batchnorm", "loss_reduction", "grad_scale")}
    if args.methods is not None:
        pairs = [item.partition("=") for item in _csv(args.methods)]
        if not pairs or any(not (a.strip() and eq and b.strip()) for a, eq, b in pairs):
            raise ConfigError(f"--methods {args.methods!r}: give LABEL=METHOD pairs separated by commas, e.g. "
                              "full_batch=mean,per_sample=none_loop")
        flags["methods"] = {a.strip(): b.strip() for a, _, b in pairs}
    try:
        info = dg.read_info(args.info).merged(dg.Info.from_dict(flags, "the flags"))
        result = dg.diagnose(dg.load(args.source, info))
    except ConfigError as exc:
        exc.subject = "diagnose input"
        raise
    print(dumps(result.to_dict()) if args.json else dg.render_text(result))
    return dg.exit_code(result)


def _check(args) -> int:
    from gradparity.commands.check import read_check_config, render_text, run_check

    inputs = None
    if args.inputs is not None:
        pairs = [item.partition("=") for item in _csv(args.inputs)]
        bad = [a for a, eq, b in pairs if not (a and eq and b)]
        if bad or not pairs:
            raise ConfigError(f"--inputs {args.inputs!r}: give ARGUMENT=ARRAY pairs separated by commas, e.g. "
                              "input_ids=input_ids,attention_mask=attention_mask")
        inputs = {a.strip(): b.strip() for a, _, b in pairs}
    flags = {"torch": args.torch, "keras": args.keras, "tf_keras": args.tf_keras, "jax": args.jax,
             "data": args.data, "loss": args.loss, "inputs": inputs, "targets": args.targets, "output": args.output,
             "weights": args.weights, "localize": args.localize,
             "weights_from": args.weights_from, "methods": None if args.methods is None else _csv(args.methods),
             "dtype": args.dtype, "mode": args.mode, "device": args.device, "precision": args.precision,
             "keras_backend": args.keras_backend, "timeout_s": args.timeout, "train_steps": args.train_steps,
             "train_optimizer": args.train_optimizer, "train_lr": args.train_lr}
    say = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        spec = read_check_config(args.config, {k: v for k, v in flags.items() if v is not None})
        report = run_check(spec, Path(args.out), say)
    except ConfigError as exc:
        if type(exc) is ConfigError:  # a MappingError or OutputError keeps its own subject
            exc.subject = "model check"
        raise
    except Interrupted as exc:
        if exc.report is None:
            raise
        report = exc.report  # the partial report was written; print it, then exit 128 + N
    if args.json:
        print(dumps(report.to_dict()))
    else:
        print(render_text(report))
        print(f"\nwrote {Path(args.out) / 'report.json'}, report.md, inputs.npz, gradients.npz")
    return report.exit_code


def _loss_table(args) -> int:
    from gradparity.backends import KERAS_VARIANTS
    from gradparity.commands.translate import TABLE_SOURCES, table_markdown, translate_many

    if args.keras_backend not in KERAS_VARIANTS:
        raise ConfigError(f"--keras-backend must be one of {', '.join(KERAS_VARIANTS)}, got {args.keras_backend!r}")
    reports, stopped = _finished(lambda: translate_many(
        list(TABLE_SOURCES), keras_backend=args.keras_backend, timeout_s=args.timeout, data=None,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True)))
    print(table_markdown(reports))
    return stopped.exit_code if stopped is not None else max(r.exit_code for r in reports)


def _doctor(args) -> int:
    """What is installed, per backend, without importing a framework; the device probe (a worker per backend,
    importing every framework) only with --devices or --device gpu."""
    import platform

    from gradparity.commands.doctor import installed, probe, render, render_installed, versions
    from gradparity.experiment.spec import DEVICES

    if args.device not in DEVICES:
        raise GradparityError(f"--device must be one of {', '.join(DEVICES)}, got {args.device!r}")
    print(f"gradparity {__version__}, Python {platform.python_version()}, {platform.platform()}")
    print("installed: " + ", ".join(f"{d} {v}" if v else f"{d} not installed" for d, v in versions().items()))
    print(render_installed(installed()))
    if not (args.devices or args.device == "gpu"):
        print("\n(devices not checked: `gradparity doctor --devices` starts each backend's worker, as a run does, "
              "and reports the device it picks)")
        return 0
    print(f"\ndevices (--device {args.device}; one worker per backend, importing its framework):")
    print(render(probe(args.device)))
    return 0


def _raise_on_signal(signum, _frame):
    """First SIGINT/SIGTERM/SIGHUP: unwind the run (workers killed, partial report written); later ones wait."""
    for sig in _HANDLED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # cleanup takes a moment: a second Ctrl-C must not cut it short
    raise Interrupted(signum)


_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signal_handlers():
    """Turn SIGINT, SIGTERM and SIGHUP into ``Interrupted`` for the duration of a command (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
    for sig in _HANDLED_SIGNALS:
        signal.signal(sig, _raise_on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _printable_streams() -> None:
    """Never crash on printing: a path or name with undecodable bytes is escaped, not an error."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def main(argv: list[str] | None = None) -> int:
    _printable_streams()
    args = _parser().parse_args(argv)
    try:
        with _signal_handlers():
            handler = {"run": _run, "doctor": _doctor, "translate": _translate, "loss-table": _loss_table,
                       "compare-losses": _compare_losses, "diagnose": _diagnose, "check": _check,
                       "optimizers": _optimizers, "train": _train, "benchmark": _benchmark}.get(args.command)
            if handler is not None:
                return handler(args)
            from gradparity.experiment.spec import default_config_text

            print(default_config_text(), end="")
            return 0
    except GradparityError as exc:
        print(f"gradparity: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Interrupted as exc:
        print(f"gradparity: interrupted by {exc.signal_name}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gradparity: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output left (``gradparity diagnose ... | head``): stop quietly, as other tools do;
        # stdout goes to /dev/null so that the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception:
        traceback.print_exc()
        print("gradparity: internal error (a bug in gradparity; please report it with the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
