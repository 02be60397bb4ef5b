"""One module per command beyond `run`: translate, compare-losses, diagnose, doctor."""
