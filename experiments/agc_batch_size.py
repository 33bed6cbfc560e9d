"""AGC lets NF-ResNets train at large batch sizes and learning rates.

ICML 2021 (Brock, De, Smith, Simonyan), Section 4 and Figure 3 (left): with
the learning rate scaled with the batch (0.1 x B / 256), an NF-ResNet
without Adaptive Gradient Clipping degrades or fails at large batch sizes,
while with AGC it trains stably and keeps up with a batch-normalized ResNet.

Here, on the embedded digits (1,437 training / 360 test images, 16x16),
three networks of one layout (pre-activation bottleneck ResNet, 3 stages of
2 blocks, widths 32-64-128, ~58k parameters) are trained from scratch for a
fixed number of epochs at batch sizes 64 ... 1024 and peak learning rates
`m x 0.1 x B / 256` for multipliers m:
  - NF-ResNet: `NFResNet`, SGD + Nesterov, no clipping;
  - NF-ResNet + AGC: the same with AGC at lambda = 0.01 (the paper's value,
    the classifier excluded; not tuned per batch: see
    `experiments.clipping_threshold`);
  - BN-ResNet: `ResNet` with batch norm, no clipping.
Everything else is the library's recipe (`optim.make_optimizer`: weight decay
2e-5, 1 epoch of linear warmup, cosine decay to 0). A run whose loss or
gradient becomes NaN/Inf stops there and is reported as diverged (NaN).

Writes `agc_batch_size.md` (accuracy table, mean over seeds [min, max]),
`agc_batch_size.csv` (one row per run) and `agc_batch_size.png`.

Usage:
  python -m experiments.agc_batch_size          # 5 x 4 x 3 cells, 3 seeds
  python -m experiments.agc_batch_size --quick  # tiny network, 2 epochs
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import itertools
import math
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python experiments/agc_batch_size.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments import small_scale as ss  # noqa: E402

MODULE = "experiments.agc_batch_size"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One line of the figure: a model family and its clipping."""
  name: str
  family: str  # 'nf' or 'bn'.
  clipping: float  # AGC lambda; ss.NO_CLIPPING for none.


@dataclasses.dataclass(frozen=True)
class Grid:
  """What is trained.

  Attributes:
    depth: blocks per stage; width: stage width multiplier (stages 64, 128,
      256 times it; bottlenecks a quarter of that).
    batch_sizes, lr_scales, seeds: the grid (peak lr = scale x 0.1 B / 256).
    epochs, warmup_epochs: run length and linear warmup.
    clipping: AGC lambda of the NF-ResNet + AGC runs.
    fast_compile: quick runs (see `small_scale.Recipe`).
  """
  depth: tuple[int, ...]
  width: float
  batch_sizes: tuple[int, ...]
  lr_scales: tuple[float, ...]
  seeds: tuple[int, ...]
  epochs: float
  warmup_epochs: float = 1.0
  clipping: float = 0.01
  fast_compile: bool = False

  def variants(self) -> tuple[Variant, ...]:
    return (Variant("NF-ResNet", "nf", ss.NO_CLIPPING),
            Variant(f"NF-ResNet + AGC (λ={self.clipping:g})", "nf",
                    self.clipping),
            Variant("BN-ResNet", "bn", ss.NO_CLIPPING))


FULL = Grid(depth=(2, 2, 2), width=0.5, batch_sizes=(64, 128, 256, 512, 1024),
            lr_scales=(0.0625, 0.25, 1.0, 4.0), seeds=(0, 1, 2), epochs=20.0)
QUICK = Grid(depth=(1,), width=0.25, batch_sizes=(32, 64), lr_scales=(1.0, 4.0),
             seeds=(0,), epochs=2.0, fast_compile=True)


def recipes(grid: Grid) -> dict[str, ss.Recipe]:
  """Family -> recipe: NF-ResNet and BN-ResNet of one layout.

  The NF-ResNet has no zero-initialized skip gain (`skipinit_gain=None`: each
  residual branch enters at alpha = 0.2 from the start, the ICLR paper's
  analysed form). With the official zero init, AGC's `eps = 1e-3` bounds a
  zero scalar's step by `lr * lambda * 1e-3`, so in runs of 30-450 steps the
  branches stay nearly off and the network is its shortcut path.
  """
  layout = dict(depth=grid.depth, width=grid.width)
  common_kw = dict(epochs=grid.epochs, warmup_epochs=grid.warmup_epochs,
                   fast_compile=grid.fast_compile)
  return {
      "nf": ss.Recipe("NFResNet", dict(layout, stochdepth_rate=0.0,
                                       skipinit_gain=None), **common_kw),
      "bn": ss.Recipe("ResNet", layout, **common_kw),
  }


def run(grid: Grid) -> tuple[list[dict[str, Any]], float]:
  """Every run of the grid; returns the rows and the compile seconds."""
  variants = grid.variants()
  total = (len(variants) * len(grid.batch_sizes) * len(grid.lr_scales)
           * len(grid.seeds))
  bar = common.progress(range(total), "runs")
  rows, compile_seconds = [], 0.0
  for family, recipe in recipes(grid).items():
    setup = ss.Setup(recipe)
    for batch_size in grid.batch_sizes:
      trainer = ss.Trainer(setup, batch_size)
      for variant, lr_scale, seed in itertools.product(
          [v for v in variants if v.family == family], grid.lr_scales,
          grid.seeds):
        result = trainer.run(seed=seed, clipping=variant.clipping,
                             lr_scale=lr_scale)
        rows.append({"model": variant.name, "batch_size": batch_size,
                     "lr_scale": lr_scale, "seed": seed,
                     "clipping": (None if math.isinf(variant.clipping)
                                  else variant.clipping), **result})
        bar.update(1)
        bar.set_postfix_str(f"{variant.name} B={batch_size} m={lr_scale:g}")
    compile_seconds += setup.compile_seconds
  bar.close()
  return rows, compile_seconds


def cells(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, batch, lr scale): `small_scale.summarize` of top-1."""
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["batch_size"], r["lr_scale"]),
                      []).append(r)
  out = []
  for (model, batch_size, lr_scale), runs in groups.items():
    out.append({"model": model, "batch_size": batch_size,
                "lr_scale": lr_scale, "peak_lr": runs[0]["peak_lr"],
                **ss.summarize([r["test_top1"] for r in runs]),
                "diverged_steps": [r["diverged_step"] for r in runs
                                   if r["diverged_step"] is not None]})
  return out


def table_rows(cell_rows: Sequence[Mapping[str, Any]],
               models: Sequence[str]) -> list[dict[str, Any]]:
  """The Markdown layout: a row per (lr scale, batch), a column per model."""
  by_key = {(c["model"], c["batch_size"], c["lr_scale"]): c
            for c in cell_rows}
  keys = sorted({(c["lr_scale"], c["batch_size"]) for c in cell_rows})
  out = []
  for lr_scale, batch_size in keys:
    row = {"lr_scale": lr_scale, "batch_size": batch_size,
           "peak_lr": by_key[(models[0], batch_size, lr_scale)]["peak_lr"]}
    for model in models:
      row[model] = ss.fmt_acc_cell(by_key[(model, batch_size, lr_scale)])
    out.append(row)
  return out


def findings(cell_rows: Sequence[Mapping[str, Any]], grid: Grid
             ) -> list[str]:
  """Sentences read off the cells (no number is written by hand)."""
  names = [v.name for v in grid.variants()]
  plain, clipped, bn = names
  by_key = {(c["model"], c["batch_size"], c["lr_scale"]): c
            for c in cell_rows}
  runs = lambda m: sum(c["n"] for c in cell_rows if c["model"] == m)
  div = lambda m: sum(c["diverged"] for c in cell_rows if c["model"] == m)
  lines = [f"- Diverged runs (NaN loss or gradient): {plain} "
           f"{div(plain)}/{runs(plain)}, {clipped} "
           f"{div(clipped)}/{runs(clipped)}, {bn} {div(bn)}/{runs(bn)}."]
  for m in grid.lr_scales:
    ok = [b for b in grid.batch_sizes if by_key[(plain, b, m)]["diverged"] == 0]
    fail = [b for b in grid.batch_sizes if b not in ok]
    lrs = {b: by_key[(plain, b, m)]["peak_lr"] for b in grid.batch_sizes}
    listed = lambda bs: (f"B = {', '.join(map(str, bs))} (peak lr "
                         f"{', '.join(f'{lrs[b]:g}' for b in bs)})")
    if not fail:
      text = "never diverged"
    elif not ok:
      text = "diverged (at least one seed) at every batch size"
    else:
      text = (f"trained at {listed(ok)} and diverged (at least one seed) "
              f"at {listed(fail)}")
    agc_div = sum(by_key[(clipped, b, m)]["diverged"]
                  for b in grid.batch_sizes)
    gaps = [by_key[(clipped, b, m)]["mean"] - by_key[(bn, b, m)]["mean"]
            for b in grid.batch_sizes]
    gaps = [g for g in gaps if not math.isnan(g)]
    gap_text = (f"; AGC minus BN: {100 * min(gaps):+.1f} to "
                f"{100 * max(gaps):+.1f} points" if gaps else "")
    plain_acc = [by_key[(plain, b, m)]["finite_mean"]
                 for b in grid.batch_sizes]
    clip_acc = [by_key[(clipped, b, m)]["finite_mean"]
                for b in grid.batch_sizes]
    acc = lambda v: ("—" if all(math.isnan(x) for x in v) else
                     f"{100 * np.nanmin(v):.1f}–{100 * np.nanmax(v):.1f}%")
    lines.append(f"- m = {m:g}: without AGC the NF-ResNet {text} (top-1 of "
                 f"its finite runs {acc(plain_acc)}); with AGC {agc_div} "
                 f"diverged run(s), top-1 {acc(clip_acc)}{gap_text}.")
  return lines


def plot(cell_rows: Sequence[Mapping[str, Any]],
         rows: Sequence[Mapping[str, Any]], grid: Grid,
         path: pathlib.Path) -> None:
  """Top-1 against batch size, a panel per lr scale, a line per model."""
  models = [v.name for v in grid.variants()]
  colors = dict(zip(models, ("tab:red", "tab:blue", "tab:gray")))
  fig, axes = plt.subplots(1, len(grid.lr_scales),
                           figsize=(3.9 * len(grid.lr_scales), 3.9),
                           sharey=True, squeeze=False)
  for ax, m in zip(axes[0], grid.lr_scales):
    for model in models:
      cs = sorted((c for c in cell_rows
                   if c["model"] == model and c["lr_scale"] == m),
                  key=lambda c: c["batch_size"])
      b = np.array([c["batch_size"] for c in cs])
      mean = np.array([100 * c["mean"] for c in cs])
      ax.plot(b, mean, "o-", color=colors[model], label=model)
      seeds = [r for r in rows if r["model"] == model and r["lr_scale"] == m]
      ok = [r for r in seeds if r["diverged_step"] is None]
      ax.scatter([r["batch_size"] for r in ok],
                 [100 * r["test_top1"] for r in ok], s=10, alpha=0.4,
                 color=colors[model])
      bad = [r for r in seeds if r["diverged_step"] is not None]
      ax.scatter([r["batch_size"] for r in bad], [0.0] * len(bad),
                 marker="x", s=50, color=colors[model])
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid.batch_sizes, [str(b) for b in grid.batch_sizes])
    ax.set_title(f"peak lr = {m:g} × 0.1 × B/256")
    ax.set_xlabel("batch size B")
    ax.axhline(10, color="k", lw=0.5, ls=":")  # Chance.
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test top-1 (%)  (× at 0: diverged)")
  axes[0][0].set_ylim(-5, 102)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(models),
             fontsize=9, frameon=False)
  layers = 3 * sum(grid.depth) + 2
  fig.suptitle(f"Digits, {layers}-layer bottleneck ResNets: AGC and batch "
               f"size ({len(grid.seeds)} seed(s); line: mean, broken where a "
               "seed diverged)", fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


CSV_COLUMNS = [common.Column(k, k) for k in (
    "model", "batch_size", "lr_scale", "peak_lr", "clipping", "seed",
    "test_top1", "test_loss", "train_loss", "diverged_step", "steps",
    "seconds")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes `agc_batch_size.{md,csv,png}` under `--out`.

  Returns:
    `{'grid', 'runs' (one dict per run, as the CSV), 'cells' (per model,
    batch and lr scale), 'table' (the Markdown rows), 'findings'}`.
  """
  args = common.make_parser(MODULE, __doc__).parse_args(argv)
  cmd = common.command(MODULE, argv)
  grid = QUICK if args.quick else FULL
  start = time.time()
  rows, compile_seconds = run(grid)
  elapsed = time.time() - start
  cell_rows = cells(rows)
  models = [v.name for v in grid.variants()]
  table = table_rows(cell_rows, models)
  columns = [common.Column("lr_scale", "lr scale m", lambda v: f"{v:g}"),
             common.Column("batch_size", "Batch B"),
             common.Column("peak_lr", "Peak lr", lambda v: f"{v:g}"),
             *[common.Column(m, f"{m} top-1 %") for m in models]]
  facts = findings(cell_rows, grid)
  r = recipes(grid)["nf"]
  notes = f"""\
Test top-1 (%) on the 360 held-out digits after {grid.epochs:g} epochs of
the 1,437 training digits (16×16), mean over seeds {list(grid.seeds)}
[min, max]; **NaN** where a run's loss or gradient became NaN/Inf (the run
stops there, see `diverged_step` in the CSV; a cell with any diverged seed
has mean NaN, the other seeds' mean in brackets). Peak lr = m × 0.1 × B/256
(`base_lr` 0.1 at batch 256, scaled linearly, as the paper), reached after
{grid.warmup_epochs:g} epoch of linear warmup, then cosine decay to 0; SGD
with Nesterov momentum {r.momentum}, weight decay {r.weight_decay:g} (not on
gains and biases): `nfnets_jax.make_optimizer`. Same initialization
and data order per seed for every model.

Networks (one layout): pre-activation bottleneck ResNet, stages of
{list(grid.depth)} blocks, width ×{grid.width:g} (stage widths
{[int(w * grid.width) for w in (64, 128, 256)][:len(grid.depth)]}), 7×7
stem + max-pool. *NF-ResNet*: `NFResNet` (Scaled WS, α = 0.2, no stochastic
depth, `skipinit_gain=None`); *+ AGC*: λ = {grid.clipping:g}, eps = 1e-3,
all parameters but the classifier weight (`optim.agc_mask`); *BN-ResNet*:
`ResNet` with batch norm.

**Findings** (computed from the table):
{chr(10).join(facts)}

Why `skipinit_gain=None`: the official NF-ResNet multiplies each residual
branch by a learnable scalar initialized at 0. AGC clips that scalar's
gradient to λ · max(|g|, eps) = λ · 1e-3, so it can only grow by a factor
~(1 + lr·λ/(1 − momentum)) per step: over these 30–450-step runs the
branches stay nearly off and, with AGC, the network trains as its shortcut
path (one 7×7 conv and 1×1 projections). That is a short-run artefact of
the zero init, not what the paper tests (90 ImageNet epochs are thousands
of steps), so the branches here start at α.

Runtime: {elapsed / 60:.1f} min on {ss.devices_description()} ({compile_seconds:.0f} s
of it compiling); jax {jax.__version__}."""
  common.write_markdown(
      args.out / "agc_batch_size.md",
      "AGC and batch size: NF-ResNet with and without AGC vs BN-ResNet",
      cmd, [common.markdown_table(table, columns), notes,
            "![accuracy against batch size](agc_batch_size.png)"])
  common.write_csv(args.out / "agc_batch_size.csv", rows, CSV_COLUMNS)
  plot(cell_rows, rows, grid, args.out / "agc_batch_size.png")
  print(f"wrote {args.out / 'agc_batch_size.md'}, .csv and .png")
  return {"grid": grid, "runs": rows, "cells": cell_rows, "table": table,
          "findings": facts}


if __name__ == "__main__":
  common.run_command(MODULE, main)
