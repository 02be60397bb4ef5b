"""The float64 reference: the yardstick every framework is measured against, differentiated by hand.

Every forward and backward pass here is written out literally in float64 numpy, following the textbook
derivation, and is itself tested against central finite differences (``tests/test_reference.py``,
``tests/test_reference_models.py``, ``tests/test_loss_reference.py``). The parent process computes with it
(tolerances, reference losses and trajectories); the numpy worker backend (``gradparity.backends.numpy``)
runs the same mathematics as a backend's reduction methods.

- ``mlp``: the built-in MLP's forward pass, softmax cross-entropy, backward pass (batch, per-example, or each
  example's term of the batch sum) and ``term_scale``, the size of those terms;
- ``models``: the same for the built-in CNN and sequence models (im2col convolutions, max pooling, LayerNorm,
  causal attention, embeddings), and their training trajectories;
- ``losses``: the loss catalogue (``gradparity.losses.catalogue``), each loss reduced with its gradient w.r.t.
  the logits, every divisor rule;
- ``train``: the MLP's training trajectory under one framework's optimizer rule, and each reduction's
  per-example loss scale.

It imports numpy only (no framework), and of gradparity only the experiment's definitions, the loss catalogue
and the worker protocol's constants.
"""
