"""Scripts that reproduce the NF papers' tables and figures.

Run each from the repository root, e.g. `python -m experiments.model_table`;
outputs (Markdown and CSV tables, PNG figures) go to `results/`.
"""
