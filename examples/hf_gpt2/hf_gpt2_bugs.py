"""Ports with a planted bug, as they happen: for ``check_buggy.toml`` and the tests.

- ``tf_model_unscaled``: the TensorFlow port's second block forgets attention's 1/sqrt(head size) scaling — a
  porting bug, found in the gradients and named where it acts: between the block's ``attn.c_attn`` (whose
  output agrees) and ``attn.c_proj`` (whose input differs).
- ``flax_model_misconverted``: a hand-written conversion step that transposes one square kernel and scales the
  final layer norm by 2 — converter bugs, found by value before any gradient.
"""
from hf_gpt2 import flax_model, tf_model


def tf_model_unscaled():
    model = tf_model()
    model.transformer.h[1].attn.scale = False
    return model


def flax_model_misconverted():
    model = flax_model()
    params = model.params
    block = params["transformer"]["h"]["0"]["attn"]["c_proj"]
    block["kernel"] = block["kernel"].T
    ln_f = params["transformer"]["ln_f"]
    ln_f["scale"] = ln_f["scale"] * 2
    model.params = params
    return model
