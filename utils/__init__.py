"""Analysis and reporting tools for loralib runs (they read the files the trainer writes; from loralib they use only
`loralib.files`, the atomic writer, which loads neither torch nor transformers).

- `utils.weight_decomposition`: magnitude / direction changes (ΔM, ΔD) of adapted weights across saved checkpoints.
- `utils.report`: the one report over results.json files: per-method tables (one task), tables next to the BiDoRA
  paper's numbers, missing runs, paired tests, markdown / JSON / figures.
- `utils.significance`: paired differences (bootstrap interval, Wilcoxon signed-rank test), BiDoRA against DoRA.
- `utils.paper_results`: the paper's published tables, kept as data in `utils/data/paper_results.json`.
"""
