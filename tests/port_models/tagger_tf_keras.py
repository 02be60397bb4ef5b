"""The tagger in TF-Keras 2 (the tf_keras package): a subclassed model called with keyword arguments."""
import tensorflow as tf
import tf_keras

VOCAB, DIM = 13, 8


class TiedHead(tf_keras.layers.Layer):
    """logits = h @ E^T + b, E the embedding layer's own variable."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(VOCAB,), initializer="zeros")

    def call(self, h):
        return tf.matmul(h, self.embedding.embeddings, transpose_b=True) + self.bias


class Tagger(tf_keras.Model):
    def __init__(self):
        super().__init__()
        self.embed = tf_keras.layers.Embedding(VOCAB, DIM, name="embed")
        self.mix = tf_keras.layers.Dense(DIM, activation="tanh", name="mix")
        self.norm = tf_keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.head = TiedHead(self.embed, name="head")

    def call(self, token_ids, mask, training=False):
        h = self.embed(token_ids)
        h = self.norm(self.mix(h * tf.cast(mask, h.dtype)[..., None]))
        return {"logits": self.head(h), "hidden": h}


def tagger():
    return Tagger()
