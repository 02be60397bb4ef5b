"""The report: report.json / report.md / npz files (render) and the output folder they go into (outdir)."""
