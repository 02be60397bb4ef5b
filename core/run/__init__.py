"""Running it: one worker process per backend (execute) and the whole run in one direction (pipeline)."""
