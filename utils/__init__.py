"""Analysis and reporting for loralib runs: one library (loading, statistics, formatting, figures) under the GLUE /
demo / protein reports, the study's report and the weight-decomposition analysis (utils/README.md).

- `utils.results`: runs' results.json and log.csv, and the study's cell records. `utils.stats`: seed series, paired
  tests, Holm. `utils.formatting`, `utils.figures`: numbers and matplotlib. `utils.magnitudes`: ΔM, ΔD and the
  relative magnitude shift, from adapter folders read through loralib.
- Reports: `utils.method_report` and `utils.paper_report` (CLI `utils/report.py`); `utils.study_tables`,
  `utils.study_figures` and `utils.estimator_comparison` (CLI `utils/study_report.py`); `utils.weight_decomposition`
  (its own CLI). `utils.paper_results`: the paper's tables, as data in `utils/data/paper_results.json`.
"""
