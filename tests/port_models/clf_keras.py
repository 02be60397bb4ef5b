"""Its Keras 3 port (weights mapped from torch's)."""
import keras


def classifier(features=6, width=16, classes=3):
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(width, activation="tanh"),
                             keras.layers.Dense(classes)])
