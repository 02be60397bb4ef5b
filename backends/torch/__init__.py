"""The torch backend: ``session`` computes the reduction methods natively in torch."""
