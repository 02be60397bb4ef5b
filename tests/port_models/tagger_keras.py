"""The tagger in Keras 3: a functional model on two named Inputs, returning a dict, with its own tied head."""
import keras
from keras import layers

VOCAB, DIM = 13, 8


class TiedHead(layers.Layer):
    """logits = h @ E^T + b, E the embedding layer's own variable."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def build(self, input_shape):
        self.b = self.add_weight(shape=(VOCAB,), initializer="zeros", name="bias")

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings)) + self.b


def tagger():
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    mask = keras.Input((None,), dtype="int32", name="mask")
    embed = layers.Embedding(VOCAB, DIM, name="embed")
    h = embed(token_ids)
    h = h * keras.ops.expand_dims(keras.ops.cast(mask, h.dtype), -1)
    h = layers.Dense(DIM, activation="tanh", name="mix")(h)
    h = layers.LayerNormalization(epsilon=1e-5, name="norm")(h)
    logits = TiedHead(embed, name="head")(h)
    return keras.Model({"token_ids": token_ids, "mask": mask}, {"logits": logits, "hidden": h})
