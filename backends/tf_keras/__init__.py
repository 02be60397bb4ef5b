"""Legacy Keras 2 (the tf_keras package): loss functions for ``gradparity translate``."""
