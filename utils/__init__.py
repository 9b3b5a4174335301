"""Analysis and reporting tools for loralib runs (no dependency on loralib: they read the files the trainer writes).

- `utils.weight_decomposition`: magnitude / direction changes (ΔM, ΔD) of adapted weights across saved checkpoints.
- `utils.aggregate_results`: mean ± std tables over seeds next to the BiDoRA paper's numbers, and the missing runs.
- `utils.significance`: Wilcoxon signed-rank test of BiDoRA against DoRA.
- `utils.paper_results`: the paper's published tables, kept as data in `utils/data/paper_results.json`.
"""
