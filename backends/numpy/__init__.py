"""The numpy backend: ``session`` runs the float64 reference (``gradparity.reference``) as a worker."""
