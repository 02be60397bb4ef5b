"""Comparing: native results normalized to one convention, pairs measured against the tolerance, the verdict."""
