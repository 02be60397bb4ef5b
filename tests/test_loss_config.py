"""The structured TOML form of a loss: each table means what its text means, and bad tables are exit 2."""
import numpy as np
import pytest

from gradparity.cli import main
from gradparity.commands.translate import loss_module
from gradparity.errors import ConfigError
from gradparity.losses.config import loss_text, read_loss_file
from gradparity.losses.text import parse_loss_text

#: (table, the text a user would write for it): the text is written by hand here, not produced by the code.
EQUIVALENT = [
    ({"loss": "torch.nn.CrossEntropyLoss",
      "options": {"weight": [1.0, 2.0, 0.5], "ignore_index": -1, "label_smoothing": 0.1}},
     "torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=-1, label_smoothing=0.1)"),
    ({"loss": "torch.nn.MSELoss", "options": {"reduction": "sum"}}, "nn.MSELoss(reduction='sum')"),
    ({"loss": "torch.nn.BCEWithLogitsLoss", "options": {"pos_weight": {"data": "pw"}}},
     "torch.nn.BCEWithLogitsLoss(pos_weight=pw)"),
    ({"loss": "keras.losses.SparseCategoricalCrossentropy",
      "options": {"from_logits": True, "reduction": "mean_with_sample_weight"},
      "call": ["y", "logits", "sample_weight=w"]},
     "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction='mean_with_sample_weight')"
     "(y, logits, sample_weight=w)"),
    ({"loss": "keras.losses.Huber", "options": {"delta": 0.5, "reduction": "sum"}},
     "keras.losses.Huber(delta=0.5, reduction='sum')"),
    ({"loss": "tf.keras.losses.SparseCategoricalCrossentropy",
      "options": {"from_logits": True, "reduction": {"enum": "tf.keras.losses.Reduction.SUM"}}},
     "tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.SUM)"),
    ({"loss": "optax.softmax_cross_entropy_with_integer_labels", "arguments": ["logits", "labels"],
      "reduce": "mean"}, "optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()"),
    ({"loss": "optax.huber_loss", "arguments": ["predictions", "targets"], "options": {"delta": 2.0},
      "reduce": "sum"}, "jnp.sum(optax.huber_loss(predictions, targets, delta=2.0))"),
]


def _semantics(text: str, arrays=None):
    expr = parse_loss_text(text, arrays)
    return expr.framework, loss_module(expr.framework).parse(expr)


@pytest.mark.parametrize("table,text", EQUIVALENT, ids=[t for _, t in EQUIVALENT])
def test_a_table_means_what_its_text_means(table, text):
    arrays = {"pw": np.array([1.0, 3.0, 0.5])}
    assert _semantics(loss_text(table), arrays) == _semantics(text, arrays)


@pytest.mark.parametrize("table,message", [
    ({"loss": "torch.nn.CrossEntropyLoss", "option": {}}, "unknown key(s) 'option'"),
    ({"loss": "torch.nn.CrossEntropyLoss()"}, "dotted name"),
    ({"options": {}}, "dotted name"),
    ({"loss": "torch.nn.CrossEntropyLoss", "options": {"weight": [1.0, float("nan")]}}, "not a finite number"),
    ({"loss": "torch.nn.CrossEntropyLoss", "options": {"weight": {"file": "w"}}}, "a table value must be"),
    ({"loss": "torch.nn.CrossEntropyLoss", "options": [1]}, "options must be a table"),
    ({"loss": "optax.huber_loss", "arguments": ["logits, labels"], "reduce": "mean"}, "not one argument"),
    ({"loss": "optax.huber_loss", "arguments": ["logits)), evil((1"], "reduce": "mean"}, "not one argument"),
    ({"loss": "optax.huber_loss", "arguments": "logits", "reduce": "mean"}, "must be a list"),
    ({"loss": "optax.huber_loss", "arguments": ["logits", "labels"], "reduce": "max"}, "reduce must be"),
])
def test_a_bad_table_is_a_config_error(table, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loss_text(table)


def test_a_table_is_read_by_the_same_reader_as_a_text():
    """What the frameworks refuse in a text is refused in a table, with the same message."""
    table = {"loss": "torch.nn.CrossEntropyLoss", "options": {"reduction": "avg"}}
    with pytest.raises(ConfigError, match="reduction must be 'mean', 'sum' or 'none'"):
        _semantics(loss_text(table))


@pytest.mark.parametrize("content,message", [
    (b"[[losses]]\nloss = 'torch.nn.MSELoss'\n[extra]\nx = 1\n", "unknown key(s) 'extra'"),
    (b"seed = 1\n", "unknown key"),
    (b"", "holds no [[losses]] table"),
    (b"[[losses]\n", "not valid TOML"),
    (b"[[losses]]\nloss = '\xff'\n", "not UTF-8"),
])
def test_a_bad_file_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "losses.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        read_loss_file(str(path))


def test_cli_reads_tables_and_refuses_bad_ones_before_any_worker(tmp_path, capsys, workers_started):
    started = workers_started
    two = tmp_path / "two.toml"
    two.write_text("[[losses]]\nloss = 'torch.nn.MSELoss'\n\n[[losses]]\nloss = 'torch.nn.L1Loss'\n")
    assert main(["translate", "--config", str(two)]) == 2
    assert "translate takes one loss" in capsys.readouterr().err
    assert main(["translate", "torch.nn.MSELoss()", "--config", str(two)]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[[losses]]\nloss = 'torch.nn.MSELoss'\noptions = { reduction = 'avg' }\n")
    assert main(["compare-losses", "torch.nn.L1Loss()", "--config", str(bad)]) == 2
    assert "reduction must be" in capsys.readouterr().err
    assert main(["compare-losses", "--config", str(tmp_path / "missing.toml")]) == 2
    assert started == []
