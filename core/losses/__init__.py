"""Loss functions as data: the catalogue, the text reader, the structured TOML form, loss batches."""
