"""Port a PyTorch loss to JAX (and Keras), and prove the port on padded, weighted batches.

The loss below is a typical sequence-model setup: class weights, label
smoothing and padding tokens marked -100. PyTorch's "mean" then divides by
the sum of the class weights of the non-padded targets, which changes from
batch to batch; a port that writes ``.mean()`` in JAX is silently wrong.

    python examples/port_torch_loss_to_jax.py

The same from the command line:

    gradparity translate "torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]), \
        ignore_index=-100, label_smoothing=0.1)" --to jax
"""
import sys

from gradparity.commands.translate import render_text, translate

TORCH_LOSS = ("torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]), "
              "ignore_index=-100, label_smoothing=0.1)")

if __name__ == "__main__":
    report = translate(TORCH_LOSS, to=("jax", "keras"), progress=lambda m: print(m, file=sys.stderr))
    print(render_text(report))
    jax = next(t for t in report.translations if t.rendering.framework == "jax")
    print("\nPaste this into your JAX code (self-contained, checked above on every batch):\n")
    print(jax.rendering.function)
    sys.exit(report.exit_code)
