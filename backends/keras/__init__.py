"""The keras backend (Keras 3 on its tensorflow, jax or torch backend): ``session`` computes every model's reduction
methods natively in keras, ``train`` trains them, ``losses`` and ``optimizers`` run loss functions and optimizer
steps; ``device`` holds each Keras backend's variant (device, precision, autodiff) and ``models`` the built-in
models."""
