"""The keras backend: ``session`` computes the reduction methods natively in keras."""
