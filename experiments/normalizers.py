"""Normalizers side by side, from batch size 2 up, and their cost per step.

The case for normalizer-free networks rests on what batch normalization does
badly at small batches. Here one small pre-activation bottleneck ResNet
(`ResNet`, stages of 1 and 1 blocks, widths 32-64, 7x7 stem + max pool) is
trained from scratch on the embedded digits (1,437 training / 360 test
images, 16x16) with each normalizer of `nfnets_jax.models.normalizers`:
  - batch norm (`hk.BatchNorm`, the NF papers' baseline);
  - running batch norm (the fast.ai course's `RunningBatchNorm`: training
    normalizes with debiased running statistics);
  - layer norm (over H, W, C per example), instance norm, group norm (at most
    `groups` groups);
  - no normalization (the same ResNet with every norm removed);
and with the NF-ResNet recipe of the same layout (`NFResNet`: Scaled Weight
Standardization, gamma-scaled ReLU, alpha = 0.2, `skipinit_gain=None`; AGC
at lambda on every parameter but the classifier weight), at batch sizes 2, 8,
32 and 128, for a fixed number of epochs with the learning rate scaled
linearly with the batch (`lr = base_lr x B / base_batch`, the NF papers' and
Goyal et al.'s rule), 3 seeds. The smallest batch is also trained at the
largest batch's learning rate (no scaling: the course notebook trains batch
2 at the lr of batch 512). Everything else is the library's recipe
(`experiments.small_scale`: SGD + Nesterov, weight decay, linear warmup then
cosine decay; a run whose loss or gradient becomes NaN/Inf stops there and is
reported as diverged).

Then, at one batch size, the time of each network's compiled train step
(forward, backward, update), measured in this process, the networks
interleaved round-robin, median over repeats, with the load average printed
before and after.

Writes `normalizers.md` (accuracy table, timing table, findings),
`normalizers.csv` (one row per normalizer and batch size: mean, standard
deviation, min, max over seeds, each seed's accuracy) and `normalizers.png`
(test accuracy against batch size, error bars over seeds).

Usage:
  python -m experiments.normalizers          # 7 x 4 x 3 runs
  python -m experiments.normalizers --quick  # tiny network, 1 seed
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python experiments/normalizers.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments import small_scale as ss  # noqa: E402
from nfnets_jax.experiment import parallel  # noqa: E402

MODULE = "experiments.normalizers"
NF = "nf"  # `Variant.normalization` of the NF-ResNet recipe.


@dataclasses.dataclass(frozen=True)
class Variant:
  """One line of the figure.

  Attributes:
    name: the label.
    normalization: a `normalizers.NORMALIZATIONS` value of the ResNet, or
      `NF` for the NF-ResNet recipe.
  """
  name: str
  normalization: str


VARIANTS = (
    Variant("BatchNorm", "batchnorm"),
    Variant("Running BatchNorm", "running_batchnorm"),
    Variant("LayerNorm", "layernorm"),
    Variant("InstanceNorm", "instancenorm"),
    Variant("GroupNorm", "groupnorm"),
    Variant("No normalization", "none"),
    Variant("NF-ResNet (Scaled WS + AGC)", NF),
)


@dataclasses.dataclass(frozen=True)
class Grid:
  """What is trained and timed.

  Attributes:
    depth: blocks per stage; width: stage width multiplier (stages 64, 128
      times it; bottlenecks a quarter of that; stem 16 times it).
    batch_sizes, seeds: the grid.
    epochs, warmup_epochs: run length (the same for every batch size) and
      linear warmup.
    base_lr, base_batch_size: peak lr = base_lr x B / base_batch_size.
    unscaled: also train the smallest batch at the largest batch's lr.
    clipping: AGC lambda of the NF-ResNet.
    groups: the group norm's most groups per layer.
    timing_batch: the batch size whose train steps are timed.
    timing_rounds, timing_steps: round-robin rounds; steps timed per network
      per round (one sample: their mean).
    fast_compile: quick runs (see `small_scale.Recipe`).
  """
  depth: tuple[int, ...]
  width: float
  batch_sizes: tuple[int, ...]
  seeds: tuple[int, ...]
  epochs: float
  warmup_epochs: float
  base_lr: float
  base_batch_size: int
  clipping: float
  groups: int
  timing_batch: int
  timing_rounds: int
  timing_steps: int
  unscaled: bool = True
  fast_compile: bool = False

  def lr_scales(self, batch_size: int) -> tuple[float, ...]:
    """The lr multipliers a batch size is trained at: 1 (linear scaling),
    and for the smallest batch with `unscaled` the one giving the largest
    batch's lr."""
    small, large = min(self.batch_sizes), max(self.batch_sizes)
    if self.unscaled and batch_size == small and large > small:
      return (1.0, large / small)
    return (1.0,)

  def peak_lr(self, batch_size: int, lr_scale: float = 1.0) -> float:
    return lr_scale * self.base_lr * batch_size / self.base_batch_size


FULL = Grid(depth=(1, 1), width=0.5, batch_sizes=(2, 8, 32, 128),
            seeds=(0, 1, 2), epochs=5.0, warmup_epochs=0.5, base_lr=0.4,
            base_batch_size=256, clipping=0.16, groups=4, timing_batch=128,
            timing_rounds=15, timing_steps=5)
QUICK = Grid(depth=(1,), width=0.25, batch_sizes=(8, 32), seeds=(0,),
             epochs=1.0, warmup_epochs=0.25, base_lr=0.4, base_batch_size=256,
             clipping=0.16, groups=4, timing_batch=32, timing_rounds=2,
             timing_steps=1, fast_compile=True)


def recipe(grid: Grid, variant: Variant) -> ss.Recipe:
  """The `small_scale.Recipe` of one line: the ResNet with the variant's
  normalizer, or the NF-ResNet of the same layout.

  The NF-ResNet has no zero-initialized skip gain and no stochastic depth
  (as `experiments.agc_batch_size`, whose module doc says why).
  """
  layout = dict(depth=grid.depth, width=grid.width)
  if variant.normalization == NF:
    family, kwargs = "NFResNet", dict(layout, stochdepth_rate=0.0,
                                      skipinit_gain=None)
  else:
    family, kwargs = "ResNet", dict(layout,
                                    normalization=variant.normalization)
    if variant.normalization == "groupnorm":
      kwargs["norm_kwargs"] = {"groups": grid.groups}
  return ss.Recipe(family, kwargs, epochs=grid.epochs,
                   warmup_epochs=grid.warmup_epochs, base_lr=grid.base_lr,
                   base_batch_size=grid.base_batch_size,
                   fast_compile=grid.fast_compile)


def clipping(grid: Grid, variant: Variant) -> float:
  """AGC's lambda for the variant: the grid's for NF, none otherwise."""
  return grid.clipping if variant.normalization == NF else ss.NO_CLIPPING


def run(grid: Grid) -> tuple[list[dict[str, Any]], dict[str, ss.Trainer],
                             float]:
  """Every run of the grid.

  Returns:
    The rows (one per run), the trainers of `grid.timing_batch` by variant
    name (compiled, for `time_steps`) and the compile seconds.
  """
  total = len(VARIANTS) * len(grid.seeds) * sum(
      len(grid.lr_scales(b)) for b in grid.batch_sizes)
  bar = common.progress(range(total), "runs")
  rows, timing, compile_seconds = [], {}, 0.0
  for variant in VARIANTS:
    setup = ss.Setup(recipe(grid, variant))
    for batch_size in grid.batch_sizes:
      trainer = ss.Trainer(setup, batch_size)
      for lr_scale in grid.lr_scales(batch_size):
        for seed in grid.seeds:
          result = trainer.run(seed=seed, clipping=clipping(grid, variant),
                               lr_scale=lr_scale)
          rows.append({"model": variant.name,
                       "normalization": variant.normalization,
                       "batch_size": batch_size, "lr_scale": lr_scale,
                       "seed": seed, **result})
          bar.update(1)
          bar.set_postfix_str(
              f"{variant.name} B={batch_size} lr={result['peak_lr']:g} "
              f"seed={seed} top-1 {result['test_top1']:.3f}")
      if batch_size == grid.timing_batch:
        timing[variant.name] = trainer
    compile_seconds += setup.compile_seconds
  bar.close()
  return rows, timing, compile_seconds


def cells(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, batch, lr scale): `small_scale.summarize` of the
  seeds' top-1, their standard deviation (ddof 1; NaN with one seed or a
  diverged one) and the seeds' values."""
  groups: dict[tuple[str, int, float], list[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["model"], r["batch_size"], r["lr_scale"]),
                      []).append(r)
  out = []
  for (model, batch_size, lr_scale), runs in groups.items():
    top1 = [r["test_top1"] for r in runs]
    summary = ss.summarize(top1)
    std = (float(np.std(top1, ddof=1))
           if len(top1) > 1 and summary["diverged"] == 0 else math.nan)
    out.append({"model": model, "normalization": runs[0]["normalization"],
                "batch_size": batch_size, "lr_scale": lr_scale,
                "peak_lr": runs[0]["peak_lr"],
                "steps": runs[0]["steps"], **summary, "std": std,
                "seeds": " ".join(str(r["seed"]) for r in runs),
                "seed_top1": " ".join(f"{v:.4f}" for v in top1)})
  return out


def fmt_cell(c: Mapping[str, Any]) -> str:
  """A Markdown cell: mean ± sd in % (or the diverged count)."""
  if c["diverged"]:
    return ss.fmt_acc_cell(c)
  if c["n"] == 1:
    return f"{100 * c['mean']:.1f}"
  return f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"


def accuracy_table(cell_rows: Sequence[Mapping[str, Any]], grid: Grid
                   ) -> tuple[list[dict[str, Any]], list[common.Column]]:
  """A row per model, a column per (batch size, lr scale)."""
  by_key = {(c["model"], c["batch_size"], c["lr_scale"]): c
            for c in cell_rows}
  keys = [(b, m) for b in grid.batch_sizes for m in grid.lr_scales(b)]
  key = lambda b, m: f"b{b}" if m == 1.0 else f"b{b}_x{m:g}"
  rows = [{"model": v.name, **{key(b, m): fmt_cell(by_key[(v.name, b, m)])
                               for b, m in keys}}
          for v in VARIANTS]
  header = lambda b, m: (f"B = {b} (lr {grid.peak_lr(b, m):g})" if m == 1.0
                         else f"B = {b} at lr {grid.peak_lr(b, m):g} "
                         "(unscaled)")
  columns = [common.Column("model", "Normalizer"),
             *[common.Column(key(b, m), header(b, m)) for b, m in keys]]
  return rows, columns


def device_batch(trainer: ss.Trainer) -> Any:
  """One training batch of the trainer's size, on the devices."""
  host = next(ss.train_batches(trainer.setup.arrays["train"],
                               trainer.batch_size, 1, seed=0))
  return parallel.shard(host, trainer.setup.mesh)


def time_steps(trainers: Mapping[str, ss.Trainer], grid: Grid
               ) -> dict[str, list[float]]:
  """Seconds per train step of each trainer's compiled step, interleaved.

  Each round times `grid.timing_steps` consecutive steps of every network
  (one sample: their mean), the order reversed every other round, so that
  machine noise hits all alike. The step is the one the runs used
  (`small_scale.Trainer`, compiled on its first run): it donates its state,
  so each network carries its own.

  Returns:
    Variant name -> `grid.timing_rounds` samples (seconds per step).
  """
  calls = {}
  for name, trainer in trainers.items():
    host_state, _ = trainer.initial_state(
        0, clipping=clipping(grid, _variant(name)), lr_scale=1.0)
    state = parallel.replicate(host_state, trainer.setup.mesh)
    batch = device_batch(trainer)
    step = trainer.compiled_step(state, batch)
    carry = {"state": state}

    def call(step=step, batch=batch, carry=carry):
      for _ in range(grid.timing_steps):
        carry["state"], metrics = step(carry["state"], batch)
      jax.block_until_ready(metrics["loss"])
    call()  # Warm up (allocations, caches).
    calls[name] = call
  samples = {name: [] for name in calls}
  for i in range(grid.timing_rounds):
    for name in list(calls)[:: 1 if i % 2 == 0 else -1]:
      start = time.perf_counter()
      calls[name]()
      samples[name].append((time.perf_counter() - start) / grid.timing_steps)
  return samples


def _variant(name: str) -> Variant:
  return next(v for v in VARIANTS if v.name == name)


def timing_rows(samples: Mapping[str, Sequence[float]], batch_size: int
                ) -> list[dict[str, Any]]:
  """Median ms per step and µs per image, relative to batch norm, spread."""
  base = statistics.median(samples[VARIANTS[0].name])
  rows = []
  for name, times in samples.items():
    med = statistics.median(times)
    rows.append({"model": name, "ms_per_step": 1e3 * med,
                 "us_per_image": 1e6 * med / batch_size,
                 "vs_batchnorm": med / base,
                 "spread": (max(times) - min(times)) / med})
  return rows


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
  return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def findings(cell_rows: Sequence[Mapping[str, Any]],
             timing: Sequence[Mapping[str, Any]], grid: Grid) -> list[str]:
  """Sentences read off the tables (no number is written by hand)."""
  by_key = {(c["model"], c["batch_size"], c["lr_scale"]): c
            for c in cell_rows}
  cell = lambda m, b, s=1.0: by_key[(m, b, s)]
  mean = lambda m, b, s=1.0: cell(m, b, s)["finite_mean"]
  small, large = min(grid.batch_sizes), max(grid.batch_sizes)
  names = [v.name for v in VARIANTS]
  bn, rbn, nf = names[0], names[1], names[-1]
  each = lambda b, s=1.0: "; ".join(f"{m} {_pct(cell(m, b, s))}"
                                    for m in names)
  lines = [f"- At B = {small} (lr {grid.peak_lr(small):g}): {each(small)}.",
           f"- At B = {large} (lr {grid.peak_lr(large):g}): {each(large)}.",
           f"- B = {large} minus B = {small}, in points: " + "; ".join(
               f"{m} {100 * (mean(m, large) - mean(m, small)):+.1f}"
               for m in names) + "."]
  for scale in grid.lr_scales(small)[1:]:
    lr = grid.peak_lr(small, scale)
    lines.append(f"- At B = {small} with the lr of B = {large} ({lr:g}, "
                 f"unscaled): {each(small, scale)}.")
    lines.append(
        f"- {rbn} minus {bn} at B = {small}: "
        f"{100 * (mean(rbn, small) - mean(bn, small)):+.1f} points at lr "
        f"{grid.peak_lr(small):g}, "
        f"{100 * (mean(rbn, small, scale) - mean(bn, small, scale)):+.1f} "
        f"at lr {lr:g}.")
  spread = lambda m: [mean(m, b) for b in grid.batch_sizes]
  lines.append(
      f"- Range over B = {small}–{large} (linear scaling): {nf} "
      f"{100 * min(spread(nf)):.1f}–{100 * max(spread(nf)):.1f}%, {bn} "
      f"{100 * min(spread(bn)):.1f}–{100 * max(spread(bn)):.1f}%.")
  diverged = [c for c in cell_rows if c["diverged"]]
  lines.append("- Diverged runs (NaN loss or gradient): " + (
      "; ".join(f"{c['model']} B = {c['batch_size']} lr {c['peak_lr']:g}: "
                f"{c['diverged']}/{c['n']}" for c in diverged)
      if diverged else "none") + ".")
  t = {r["model"]: r for r in timing}
  fastest = min(timing, key=lambda r: r["ms_per_step"])
  lines.append(
      f"- Train step at B = {grid.timing_batch}: {nf} "
      f"{t[nf]['ms_per_step']:.2f} ms against {bn} {t[bn]['ms_per_step']:.2f}"
      f" ms (ratio {t[nf]['vs_batchnorm']:.2f}); {names[-2]} "
      f"{t[names[-2]]['ms_per_step']:.2f} ms; fastest: {fastest['model']}.")
  return lines


def _pct(c: Mapping[str, Any]) -> str:
  """A cell in words: mean ± sd %, or how many seeds diverged."""
  if c["diverged"] == c["n"]:
    return "diverged"
  text = f"{100 * c['finite_mean']:.1f}%"
  if c["n"] > 1 and not math.isnan(c["std"]):
    text += f" ± {100 * c['std']:.1f}"
  if c["diverged"]:
    text += f" ({c['diverged']}/{c['n']} diverged)"
  return text


COLORS = ("tab:blue", "tab:cyan", "tab:green", "tab:olive", "tab:purple",
          "tab:gray", "tab:red")


def plot(cell_rows: Sequence[Mapping[str, Any]], grid: Grid,
         path: pathlib.Path) -> None:
  """Test top-1 against batch size (log x), a line per model (linear lr
  scaling), open markers: the smallest batch at the largest batch's lr;
  error bars: the seeds' standard deviation; x at 0: a diverged seed."""
  fig, ax = plt.subplots(figsize=(9.5, 4.8))
  for k, (variant, color) in enumerate(zip(VARIANTS, COLORS)):
    mine = [c for c in cell_rows if c["model"] == variant.name]
    # A small horizontal offset per line keeps error bars apart.
    shift = 1.04 ** (k - 3)
    for scaled in (True, False):
      cs = sorted((c for c in mine if (c["lr_scale"] == 1.0) == scaled),
                  key=lambda c: c["batch_size"])
      if not cs:
        continue
      b = np.array([c["batch_size"] for c in cs]) * shift
      acc = np.array([100 * c["finite_mean"] for c in cs])
      err = np.array([0.0 if math.isnan(c["std"]) else 100 * c["std"]
                      for c in cs])
      ax.errorbar(b, acc, yerr=err, marker="o", color=color, capsize=3,
                  label=variant.name if scaled else None, lw=1.5,
                  ls=("--" if variant.normalization == NF else "-")
                  if scaled else "none",
                  mfc=color if scaled else "white")
      bad = [bb for bb, c in zip(b, cs) if c["diverged"]]
      ax.scatter(bad, [0.0] * len(bad), marker="x", s=50, color=color)
  ax.set_xscale("log", base=2)
  ax.set_xticks(grid.batch_sizes, [str(b) for b in grid.batch_sizes])
  ax.set_xlabel(f"batch size B (peak lr = {grid.base_lr:g} × B / "
                f"{grid.base_batch_size}; open markers: B = "
                f"{min(grid.batch_sizes)} at lr "
                f"{grid.peak_lr(max(grid.batch_sizes)):g})", fontsize=9)
  ax.set_ylabel("test top-1 (%)")
  ax.axhline(10, color="k", lw=0.5, ls=":")  # Chance.
  ax.set_ylim(-3, 102)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  layers = 3 * sum(grid.depth) + 2
  ax.set_title(f"Digits, {layers}-layer bottleneck ResNet, {grid.epochs:g} "
               f"epochs: normalizers against batch size\n(mean over "
               f"{len(grid.seeds)} seed(s), bars: standard deviation)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


CSV_COLUMNS = [common.Column(k, k) for k in (
    "model", "normalization", "batch_size", "lr_scale", "peak_lr", "steps",
    "n", "mean",
    "std", "min", "max", "diverged", "seeds", "seed_top1")]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes `normalizers.{md,csv,png}` under `--out`.

  Returns:
    `{'grid', 'runs' (one dict per run), 'cells' (the CSV rows), 'timing'
    (the timing rows), 'load' (before, after), 'findings'}`.
  """
  args = common.make_parser(MODULE, __doc__).parse_args(argv)
  cmd = common.command(MODULE, argv)
  grid = QUICK if args.quick else FULL
  start = time.time()
  rows, trainers, compile_seconds = run(grid)
  train_elapsed = time.time() - start
  load_before = load_average()
  print(f"timing train steps at B = {grid.timing_batch}; load average "
        f"(1, 5, 15 min): {load_before}", file=sys.stderr, flush=True)
  samples = time_steps(trainers, grid)
  load_after = load_average()
  print(f"load average after timing: {load_after}", file=sys.stderr,
        flush=True)
  elapsed = time.time() - start
  cell_rows = sorted(cells(rows), key=lambda c: (
      [v.name for v in VARIANTS].index(c["model"]), c["batch_size"],
      c["lr_scale"]))
  timing = timing_rows(samples, grid.timing_batch)
  table, columns = accuracy_table(cell_rows, grid)
  timing_columns = [
      common.Column("model", "Network"),
      common.Column("ms_per_step", "ms / step", common.fmt_float(2)),
      common.Column("us_per_image", "µs / image", common.fmt_float(0)),
      common.Column("vs_batchnorm", "× BatchNorm", common.fmt_float(2)),
      common.Column("spread", "spread (max−min)/median",
                    lambda v: f"{100 * v:.0f}%")]
  facts = findings(cell_rows, timing, grid)
  r = recipe(grid, VARIANTS[0])
  widths = [int(w * grid.width) for w in (64, 128, 256)][:len(grid.depth)]
  notes = f"""\
Test top-1 (%) on the 360 held-out digits after {grid.epochs:g} epochs of
the 1,437 training digits (16×16) at every batch size, mean ± standard
deviation over seeds {list(grid.seeds)} (each seed's value in the CSV);
**NaN** where a run's loss or gradient became NaN/Inf (the run stops there).
Peak lr = {grid.base_lr:g} × B / {grid.base_batch_size} (linear scaling
from a base lr at a base batch, as the NF papers' 0.1 × B/256, here with a
base of {grid.base_lr:g} so that {grid.epochs:g} epochs suffice), after
{grid.warmup_epochs:g} epoch of linear warmup, then cosine decay to 0; SGD
with Nesterov momentum {r.momentum}, weight decay {r.weight_decay:g} (not on
gains and biases): `nfnets_jax.make_optimizer`. Same initialization per seed
within a network, same data order per seed for every network. The
*unscaled* column trains the smallest batch at the largest batch's learning
rate, as the fast.ai course notebook does (its batch-2 runs use the lr of its
batch-512 runs).

Networks (one layout): pre-activation bottleneck ResNet, stages of
{list(grid.depth)} blocks, stage widths {widths}, 7×7 stem + max-pool
(feature maps 4×4 and 2×2). The ResNet (`nj.ResNet`) with
`normalization=` batchnorm (`hk.BatchNorm`, decay 0.9), running_batchnorm
(the fast.ai `RunningBatchNorm`, momentum 0.1), layernorm, instancenorm,
groupnorm (at most {grid.groups} groups per layer) or none; *NF-ResNet*:
`NFResNet` of the same layout (Scaled WS, α = 0.2, no stochastic depth,
`skipinit_gain=None`) with AGC at λ = {grid.clipping:g}, eps = 1e-3, every
parameter but the classifier weight (`optim.agc_mask`).

Training runtime: {train_elapsed / 60:.1f} min on {ss.devices_description()}
({compile_seconds:.0f} s of it compiling); whole script
{elapsed / 60:.1f} min; jax {jax.__version__}."""
  timing_notes = f"""\
The compiled train step of the runs above (forward, backward, optimizer
update; the NF-ResNet's with AGC) at B = {grid.timing_batch}, 16×16 images,
float32, in this process: {grid.timing_rounds} round-robin rounds (order
reversed every other round) of {grid.timing_steps} steps per network, median
of the rounds' per-step times. Load average (1, 5, 15 min) before:
{load_before}; after: {load_after} (on {os.cpu_count()} cores: a load above
the core count means other processes shared the CPU, and the absolute times
and small differences are not reliable). For the cost at ImageNet scale
(BN- against NF-ResNet-50) see `benchmarks/normalization_cost.py`."""
  common.write_markdown(
      args.out / "normalizers.md",
      "Normalizers side by side: accuracy against batch size, cost per step",
      cmd, [common.markdown_table(table, columns), notes,
            "**Findings** (computed from the tables):\n" + "\n".join(facts),
            "![accuracy against batch size](normalizers.png)",
            "## Time per train step",
            common.markdown_table(timing, timing_columns), timing_notes])
  common.write_csv(args.out / "normalizers.csv", cell_rows, CSV_COLUMNS)
  plot(cell_rows, grid, args.out / "normalizers.png")
  print(f"wrote {args.out / 'normalizers.md'}, .csv and .png")
  return {"grid": grid, "runs": rows, "cells": cell_rows, "timing": timing,
          "load": (load_before, load_after), "findings": facts}


if __name__ == "__main__":
  common.run_command(MODULE, main)
