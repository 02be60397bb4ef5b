"""The experiment: spec (TOML + overrides -> Experiment), canonical inputs, methods, models, discrepancy switches."""
