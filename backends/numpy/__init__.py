"""The numpy backend: ``session`` computes the reduction methods (the float64 reference, by hand)."""
