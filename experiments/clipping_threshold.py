"""The best AGC clipping threshold lambda against batch size.

ICML 2021 (Brock, De, Smith, Simonyan), Section 4.1 and Figure 3 (right):
the optimal clipping threshold depends on the batch size; larger batches
need smaller lambda (at batch 4096, lambda = 0.01 and below).

Here an NF-ResNet (the network of `experiments.agc_batch_size`: 3 stages of
2 bottleneck blocks, widths 32-64-128, 16x16 digits) is trained for a fixed
number of epochs at batch sizes 64 ... 1024 with the paper's learning rate
0.1 x B / 256 for every threshold lambda in 0.005 ... 0.64, and without AGC
(lambda = inf). The best lambda of a batch size is the one with the highest
mean test top-1 over seeds; a lambda with a diverged seed (NaN) cannot win.

Writes `clipping_threshold.md` (table, best lambda per batch),
`clipping_threshold.csv` (one row per run) and `clipping_threshold.png`.

Usage:
  python -m experiments.clipping_threshold          # 5 batches x 9, 3 seeds
  python -m experiments.clipping_threshold --quick  # tiny network, 2 epochs
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

if __package__ in (None, ""):  # `python experiments/clipping_threshold.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import agc_batch_size  # noqa: E402
from experiments import common  # noqa: E402
from experiments import small_scale as ss  # noqa: E402

MODULE = "experiments.clipping_threshold"


@dataclasses.dataclass(frozen=True)
class Grid:
  """What is trained (see `agc_batch_size.Grid` for the shared fields).

  Attributes:
    clippings: the lambdas; `ss.NO_CLIPPING` (inf) is the run without AGC,
      shown for reference and never chosen as best.
    lr_scale: peak lr = lr_scale x 0.1 x B / 256.
  """
  depth: tuple[int, ...]
  width: float
  batch_sizes: tuple[int, ...]
  clippings: tuple[float, ...]
  seeds: tuple[int, ...]
  epochs: float
  lr_scale: float = 1.0
  warmup_epochs: float = 1.0
  fast_compile: bool = False

  @property
  def lambdas(self) -> tuple[float, ...]:
    """The finite thresholds (candidates for best)."""
    return tuple(c for c in self.clippings if not math.isinf(c))


FULL = Grid(depth=(2, 2, 2), width=0.5, batch_sizes=(64, 128, 256, 512, 1024),
            clippings=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                       ss.NO_CLIPPING),
            seeds=(0, 1, 2), epochs=20.0)
QUICK = Grid(depth=(1,), width=0.25, batch_sizes=(32, 64),
             clippings=(0.01, 0.04, ss.NO_CLIPPING), seeds=(0,), epochs=2.0,
             lr_scale=4.0, fast_compile=True)


def recipe(grid: Grid) -> ss.Recipe:
  """The NF-ResNet recipe of `agc_batch_size` (`skipinit_gain=None`)."""
  return agc_batch_size.recipes(agc_batch_size.Grid(
      depth=grid.depth, width=grid.width, batch_sizes=grid.batch_sizes,
      lr_scales=(grid.lr_scale,), seeds=grid.seeds, epochs=grid.epochs,
      warmup_epochs=grid.warmup_epochs,
      fast_compile=grid.fast_compile))["nf"]


def run(grid: Grid) -> tuple[list[dict[str, Any]], float]:
  """Every run of the grid; returns the rows and the compile seconds."""
  setup = ss.Setup(recipe(grid))
  total = len(grid.batch_sizes) * len(grid.clippings) * len(grid.seeds)
  bar = common.progress(range(total), "runs")
  rows = []
  for batch_size in grid.batch_sizes:
    trainer = ss.Trainer(setup, batch_size)
    for clipping, seed in itertools.product(grid.clippings, grid.seeds):
      result = trainer.run(seed=seed, clipping=clipping,
                           lr_scale=grid.lr_scale)
      rows.append({"batch_size": batch_size, "clipping": clipping,
                   "seed": seed, **result})
      bar.update(1)
      bar.set_postfix_str(f"B={batch_size} λ={clipping:g}")
  bar.close()
  return rows, setup.compile_seconds


def _key(clipping: float) -> str:
  return "no_agc" if math.isinf(clipping) else f"lambda_{clipping:g}"


def _header(clipping: float) -> str:
  return "no AGC" if math.isinf(clipping) else f"λ={clipping:g}"


def best_lambda(means: Mapping[float, float]) -> float | None:
  """The finite lambda of highest mean top-1 (NaN cells excluded; the
  smallest lambda on ties), or None if every cell is NaN."""
  finite = {c: m for c, m in means.items()
            if not math.isinf(c) and not math.isnan(m)}
  if not finite:
    return None
  top = max(finite.values())
  return min(c for c, m in finite.items() if m == top)


def table(rows: Sequence[Mapping[str, Any]], grid: Grid
          ) -> list[dict[str, Any]]:
  """A row per batch size: every lambda's summary and the best lambda."""
  out = []
  for batch_size in grid.batch_sizes:
    row: dict[str, Any] = {"batch_size": batch_size}
    means = {}
    for clipping in grid.clippings:
      runs = [r for r in rows if r["batch_size"] == batch_size
              and r["clipping"] == clipping]
      s = ss.summarize([r["test_top1"] for r in runs])
      row[_key(clipping)] = s
      row["peak_lr"] = runs[0]["peak_lr"]
      means[clipping] = s["mean"]
    best = best_lambda(means)
    row["best_lambda"] = best
    row["best_top1"] = None if best is None else means[best]
    out.append(row)
  return out


def findings(table_rows: Sequence[Mapping[str, Any]], grid: Grid
             ) -> list[str]:
  """Sentences read off the table (no number written by hand)."""
  best = [(r["batch_size"], r["best_lambda"]) for r in table_rows]
  known = [(b, c) for b, c in best if c is not None]
  lines = ["- Best λ per batch size: " + ", ".join(
      f"B={b}: {'none (all NaN)' if c is None else f'{c:g}'}"
      for b, c in best) + "."]
  if len(known) >= 2:
    lam = [c for _, c in known]
    nonincreasing = all(b <= a for a, b in zip(lam, lam[1:]))
    if len(set(lam)) == 1:
      trend = "is the same at every batch size"
    else:
      log_b = np.log([b for b, _ in known])
      corr = float(np.corrcoef(log_b, np.log(lam))[0, 1])
      trend = ("never increases with the batch size" if nonincreasing else
               "does not decrease monotonically with the batch size")
      trend += f" (correlation of log λ* with log B: {corr:+.2f})"
    lines.append(f"- The best λ {trend}; the paper: smaller λ is better at "
                 "larger batch.")
  for r in table_rows:
    c = r["best_lambda"]
    if c is None:
      continue
    best_mean = r[_key(c)]["mean"]
    s = r[_key(c)]
    # Thresholds whose mean beats the best one's worst seed: how sharp the
    # optimum is against the seed-to-seed spread.
    close = [x for x in grid.lambdas
             if not math.isnan(r[_key(x)]["mean"])
             and r[_key(x)]["mean"] >= s["min"]]
    edge = (" (edge of the grid)" if c in (grid.lambdas[0], grid.lambdas[-1])
            else "")
    no_agc = r[_key(ss.NO_CLIPPING)] if ss.NO_CLIPPING in grid.clippings \
        else None
    extra = ""
    if no_agc is not None:
      extra = ("; without AGC " + ss.fmt_acc_cell(no_agc))
    diverged = [f"{x:g}" for x in grid.lambdas if r[_key(x)]["diverged"]]
    div_text = (f"; λ with a diverged seed: {', '.join(diverged)}"
                if diverged else "")
    lines.append(
        f"- B={r['batch_size']} (peak lr {r['peak_lr']:g}): best λ={c:g}"
        f"{edge} at "
        f"{100 * best_mean:.1f}% (seeds {100 * s['min']:.1f}–"
        f"{100 * s['max']:.1f}); λ with a mean above its worst seed: "
        f"{{{', '.join(f'{x:g}' for x in close)}}}{div_text}{extra}.")
  return lines


def _accuracy_panel(ax: Any, table_rows: Sequence[Mapping[str, Any]],
                    rows: Sequence[Mapping[str, Any]], grid: Grid) -> None:
  """Top-1 against lambda: a line per batch (means), dots (seeds), x
  (diverged seeds, at 0), a star at the best lambda, a square for no AGC."""
  lambdas = grid.lambdas
  x_inf = lambdas[-1] * 2.8  # Where "no AGC" is drawn.
  cmap = plt.get_cmap("viridis")
  for i, r in enumerate(table_rows):
    color = cmap(i / max(1, len(table_rows) - 1))
    b = r["batch_size"]
    ax.plot(lambdas, [100 * r[_key(c)]["mean"] for c in lambdas], "o-",
            color=color, label=f"B={b} (lr {r['peak_lr']:g})")
    runs = [q for q in rows if q["batch_size"] == b]
    xs = [x_inf if math.isinf(q["clipping"]) else q["clipping"]
          for q in runs]
    ok = [q["diverged_step"] is None for q in runs]
    ax.scatter([x for x, k in zip(xs, ok) if k],
               [100 * q["test_top1"] for q, k in zip(runs, ok) if k],
               s=10, alpha=0.35, color=color)
    ax.scatter([x for x, k in zip(xs, ok) if not k],
               [0.0] * (len(ok) - sum(ok)), marker="x", s=50, color=color)
    if ss.NO_CLIPPING in grid.clippings:
      m = r[_key(ss.NO_CLIPPING)]["mean"]
      if not math.isnan(m):
        ax.plot([x_inf], [100 * m], "s", color=color, ms=7, mfc="none")
    if r["best_lambda"] is not None:
      ax.plot([r["best_lambda"]], [100 * r["best_top1"]], "*", color=color,
              ms=14, mec="k")
  ax.set_xscale("log")
  ticks = [*lambdas, x_inf] if ss.NO_CLIPPING in grid.clippings else lambdas
  ax.set_xticks(ticks, [f"{c:g}" for c in lambdas]
                + (["no\nAGC"] if len(ticks) > len(lambdas) else []))
  ax.minorticks_off()
  ax.set_xlabel("clipping threshold λ")
  ax.grid(alpha=0.3)


def plot(table_rows: Sequence[Mapping[str, Any]],
         rows: Sequence[Mapping[str, Any]], grid: Grid,
         path: pathlib.Path) -> None:
  """Top-1 against lambda (all, and zoomed on the top); best lambda."""
  fig, (ax, zoom, ax2) = plt.subplots(
      1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [2, 2, 1.3]})
  for a in (ax, zoom):
    _accuracy_panel(a, table_rows, rows, grid)
  ax.set_ylabel("test top-1 (%)  (× at 0: diverged)")
  ax.set_ylim(-5, 102)
  ax.legend(fontsize=8, loc="lower left")
  ax.set_title(f"mean of {len(grid.seeds)} seed(s) (dots: seeds, ★ best, "
               "□ no AGC)", fontsize=10)
  tops = [100 * r["best_top1"] for r in table_rows
          if r["best_top1"] is not None]
  low = min(tops) - 8 if tops else 0
  zoom.set_ylim(low, 100)
  zoom.set_title("the same, zoomed on the top", fontsize=10)
  lambdas = grid.lambdas
  known = [(r["batch_size"], r["best_lambda"]) for r in table_rows
           if r["best_lambda"] is not None]
  if known:
    ax2.plot(*zip(*known), "*-", color="k", ms=12)
  ax2.set_xscale("log", base=2)
  ax2.set_yscale("log")
  ax2.set_xticks(grid.batch_sizes, [str(b) for b in grid.batch_sizes])
  ax2.set_yticks(lambdas, [f"{c:g}" for c in lambdas])
  ax2.minorticks_off()
  ax2.set_ylim(lambdas[0] / 1.5, lambdas[-1] * 1.5)
  ax2.set_xlabel("batch size B")
  ax2.set_ylabel("best λ")
  ax2.grid(alpha=0.3)
  ax2.set_title("best λ against batch size", fontsize=10)
  fig.suptitle(f"NF-ResNet on digits, peak lr = {grid.lr_scale:g} × 0.1 × "
               f"B/256, {grid.epochs:g} epochs", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


CSV_COLUMNS = [common.Column(k, k) for k in (
    "batch_size", "peak_lr", "clipping", "seed", "test_top1", "test_loss",
    "train_loss", "diverged_step", "steps", "seconds")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes `clipping_threshold.{md,csv,png}` under `--out`.

  Returns:
    `{'grid', 'runs' (one dict per run, as the CSV), 'table' (a row per
    batch size: a `small_scale.summarize` dict per lambda under
    'lambda_<λ>' / 'no_agc', and 'best_lambda'), 'findings'}`.
  """
  args = common.make_parser(MODULE, __doc__).parse_args(argv)
  cmd = common.command(MODULE, argv)
  grid = QUICK if args.quick else FULL
  start = time.time()
  rows, compile_seconds = run(grid)
  elapsed = time.time() - start
  table_rows = table(rows, grid)
  columns = [common.Column("batch_size", "Batch B"),
             common.Column("peak_lr", "Peak lr", lambda v: f"{v:g}"),
             *[common.Column(_key(c), _header(c), ss.fmt_acc_cell)
               for c in grid.clippings],
             common.Column("best_lambda", "Best λ", lambda v: f"**{v:g}**")]
  facts = findings(table_rows, grid)
  r = recipe(grid)
  notes = f"""\
Test top-1 (%) on the 360 held-out digits, mean over seeds
{list(grid.seeds)} [min, max]; **NaN** where a run's loss or gradient became
NaN/Inf (it stops there; a cell with any diverged seed has mean NaN and the
other seeds' mean in brackets). *Best λ*: the finite λ of highest mean
(`best_lambda`; NaN cells excluded, ties to the smaller λ); "no AGC" is the
reference run without clipping. One test image is 0.28 points.

Recipe: NF-ResNet (`NFResNet`, stages of {list(grid.depth)} bottleneck
blocks, width ×{grid.width:g}, Scaled WS, α = 0.2, `skipinit_gain=None`: see
`agc_batch_size.md`), {grid.epochs:g} epochs of the 1,437 training digits
(16×16); SGD + Nesterov {r.momentum}, weight decay {r.weight_decay:g}, peak
lr = {grid.lr_scale:g} × 0.1 × B/256 after {grid.warmup_epochs:g} epoch of
warmup, cosine decay to 0 (`optim.make_optimizer`); AGC (`adaptive_grad_clip`,
eps = {r.agc_eps:g}) on all parameters but the classifier weight
(`optim.agc_mask`), first in the chain. λ and the lr multiplier are
injected hyperparameters (`optax.inject_hyperparams`), so one compiled step
serves every λ of a batch size; the chain equals `make_optimizer` with
`agc.clipping = λ` (tested).

**Findings** (computed from the table):
{chr(10).join(facts)}

Runtime: {elapsed / 60:.1f} min on {ss.devices_description()} ({compile_seconds:.0f} s
of it compiling); jax {jax.__version__}."""
  common.write_markdown(
      args.out / "clipping_threshold.md",
      "Best AGC clipping threshold λ against batch size", cmd,
      [common.markdown_table(table_rows, columns), notes,
       "![accuracy against clipping threshold](clipping_threshold.png)"])
  # No AGC is clipping = inf (`float('inf')` reads it back).
  common.write_csv(args.out / "clipping_threshold.csv", rows, CSV_COLUMNS)
  plot(table_rows, rows, grid, args.out / "clipping_threshold.png")
  print(f"wrote {args.out / 'clipping_threshold.md'}, .csv and .png")
  return {"grid": grid, "runs": rows, "table": table_rows, "findings": facts}


if __name__ == "__main__":
  common.run_command(MODULE, main)
