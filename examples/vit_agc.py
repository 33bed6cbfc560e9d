"""A small Flax NNX vision transformer on the digits, AdamW with and without AGC.

The 8x8 digits (`nfnets_jax.data.sources.digits_images`: 1,437 train and 360
test images) are cut into 2x2 patches (16 tokens), embedded, passed through
pre-LayerNorm transformer blocks (`nnx.MultiHeadAttention` and a GELU MLP),
mean-pooled and classified. The optimizer is `optax.adamw` with linear warmup
and cosine decay, optionally after `nj.adaptive_grad_clip(lambda,
layout="flax", exclude=AGC_EXCLUDE)` on the raw gradient. Every run records
the fraction of units AGC clipped at each step (`nj.clip_stats`).

The defaults are where AGC matters on this problem: batch 32 and AdamW's
peak learning rate 0.03, high enough that AdamW alone trains worse than with
AGC (docs/agc.md, "Choosing λ for adaptive optimizers", has the measured
tables and the commands that made them).

Usage, from the repository root:
  python -m examples.vit_agc                          # the sweep of the docs
  python -m examples.vit_agc --clipping 0 0.1 --seeds 0 --steps 200
  python examples/vit_agc.py --width 16 --depth 1 --steps 30   # tiny

Prints a progress line every `--log_every` steps and, at the end, a Markdown
table (lambda, seeds, test accuracy, final train loss, mean clip fraction,
wall time); `--out PATH` also writes it (`.csv`: one row per run).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import csv
import dataclasses
import functools
import pathlib
import sys
import time
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nfnets_jax as nj
from nfnets_jax.data import sources

# The classifier's kernel is left unclipped, as the NFNet paper does.
AGC_EXCLUDE = r"^head/kernel$"
NUM_CLASSES = 10
IMAGE_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run.

  Attributes:
    steps: optimizer steps.
    batch_size: examples per step (sampled without replacement per step).
    learning_rate: AdamW's peak learning rate.
    clipping: AGC's lambda; 0 means no AGC.
    seed: the run's one seed (model init and batches).
    width: token width.
    depth: transformer blocks.
    heads: attention heads.
    patch: patch side in pixels (8 / patch squared tokens).
    mlp_ratio: MLP hidden width / width.
    weight_decay: AdamW's decoupled weight decay (kernels and the position
      embedding only, see `decay_mask`).
    warmup_fraction: the first `int(warmup_fraction * steps)` steps warm the
      learning rate up linearly from 0; cosine decay to 0 follows.
    eps: AGC's lower bound on parameter norms.
    log_every: steps between progress lines (and between host syncs).
  """
  steps: int = 600
  batch_size: int = 32
  learning_rate: float = 3e-2
  clipping: float = 0.0
  seed: int = 0
  width: int = 64
  depth: int = 2
  heads: int = 4
  patch: int = 2
  mlp_ratio: int = 2
  weight_decay: float = 1e-4
  warmup_fraction: float = 0.05
  eps: float = 1e-3
  log_every: int = 100


class Digits(NamedTuple):
  """The digits as float arrays in [0, 1].

  Attributes:
    train_images: float32 [1437, 8, 8, 1].
    train_labels: int32 [1437].
    test_images: float32 [360, 8, 8, 1].
    test_labels: int32 [360].
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


@functools.lru_cache(maxsize=1)
def load_digits() -> Digits:
  """The package's digits split at their native 8x8, one channel, in [0, 1]."""
  images, labels = sources.digits_images(IMAGE_SIZE)
  gray = {k: v[..., :1].astype(np.float32) / 255.0 for k, v in images.items()}
  return Digits(gray["train"], labels["train"], gray["test"], labels["test"])


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] images -> [B, (H / patch) * (W / patch), patch * patch * C]."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, *,
               rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=heads, in_features=width, decode=False, keep_rngs=False,
        rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, width] -> [B, T, width]."""
    x = x + self.attn(self.norm1(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
  """Patch embedding, learned position embedding, blocks, mean pool, head."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    tokens = (IMAGE_SIZE // config.patch) ** 2
    self.patch = config.patch
    self.embed = nnx.Linear(config.patch ** 2, config.width, rngs=rngs)
    self.pos = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (tokens, config.width)))
    self.blocks = nnx.List([
        Block(config.width, config.heads, config.mlp_ratio, rngs=rngs)
        for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.width, rngs=rngs)
    self.head = nnx.Linear(config.width, NUM_CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, 8, 8, 1] images -> [B, 10] logits."""
    x = self.embed(patchify(images, self.patch)) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x.mean(axis=1)))


def decay_mask(params: Any) -> Any:
  """Weight decay on kernels and the position embedding; none on biases
  (also the attention's (heads, head_dim) ones) and LayerNorm scales."""
  def decayed(path, _) -> bool:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return name == "pos" or name.endswith("kernel")
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """AGC (if `config.clipping` > 0) on the raw gradient, then AdamW.

  AGC uses the Flax layout (attention query/key/value kernels have a unit per
  (head, head_dim) pair) and leaves the classifier kernel (`AGC_EXCLUDE`)
  unclipped; it tracks the fraction of units clipped for `nj.clip_stats`.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, int(config.warmup_fraction * config.steps),
      config.steps)
  adamw = optax.adamw(schedule, weight_decay=config.weight_decay,
                      mask=decay_mask)
  if config.clipping <= 0:
    return adamw
  agc = nj.adaptive_grad_clip(config.clipping, config.eps, layout="flax",
                              exclude=AGC_EXCLUDE, track_clip_stats=True)
  return optax.chain(agc, adamw)


class TrainState(NamedTuple):
  """Everything that changes during training.

  Attributes:
    params: the model's `nnx.Param`s as a pure `nnx.State`.
    opt_state: the optimizer's state.
    step: int32 scalar, steps taken.
  """
  params: Any
  opt_state: Any
  step: jax.Array


def init_params(config: Config, key: jax.Array) -> Any:
  """The model's `nnx.Param`s, initialized from `key`, as a pure `nnx.State`."""
  return nnx.as_pure(nnx.split(ViT(config, rngs=nnx.Rngs(params=key)),
                               nnx.Param)[1])


def clip_fraction(opt_state: Any) -> jax.Array:
  """Fraction of all units clipped at the last update (0 without AGC)."""
  return nj.clip_stats(opt_state).get("agc_clip_frac", jnp.zeros([]))


def make_train_chunk(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
    images: jax.Array, labels: jax.Array, batch_size: int
) -> Callable[..., tuple[TrainState, jax.Array, jax.Array]]:
  """A jitted `(state, key, length) -> (state, losses, clip_fracs)`.

  It takes `length` steps in one `lax.scan`; step s draws its batch with
  `fold_in(key, s)`, so a run's batches depend only on its seed. `losses` and
  `clip_fracs` are float32 [length], one per step.
  """
  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(state: TrainState, key: jax.Array):
    batch_key = jax.random.fold_in(key, state.step)
    idx = jax.random.choice(batch_key, images.shape[0], (batch_size,),
                            replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images[idx],
                                              labels[idx])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(params, opt_state, state.step + 1)
    return new, (loss, clip_fraction(opt_state))

  @functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
  def train_chunk(state: TrainState, key: jax.Array, length: int):
    state, (losses, fracs) = jax.lax.scan(
        lambda s, _: step(s, key), state, None, length=length)
    return state, losses, fracs

  return train_chunk


class Trainer(NamedTuple):
  """What a run compiles: shared by every seed of one configuration.

  Attributes:
    graphdef: the model's structure (`nnx.split`).
    tx: the optimizer (`make_optimizer`).
    train_chunk: `make_train_chunk` on the training split.
    accuracy: jitted `params -> test top-1` (float32 scalar).
  """
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  train_chunk: Callable[..., tuple[TrainState, jax.Array, jax.Array]]
  accuracy: Callable[[Any], jax.Array]


@functools.lru_cache(maxsize=2)
def trainer(config: Config) -> Trainer:
  """The `Trainer` of `config`, whose seed it ignores (`run` passes seed 0).

  Cached, so the seeds of one lambda share one compilation.
  """
  data = load_digits()
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: ViT(config, rngs=nnx.Rngs(params=0))))
  tx = make_optimizer(config)
  train_chunk = make_train_chunk(
      graphdef, tx, jnp.asarray(data.train_images),
      jnp.asarray(data.train_labels), config.batch_size)
  test_images = jnp.asarray(data.test_images)
  test_labels = jnp.asarray(data.test_labels)

  @jax.jit
  def accuracy(params: Any) -> jax.Array:
    logits = nnx.merge(graphdef, params)(test_images)
    return jnp.mean(jnp.argmax(logits, axis=-1) == test_labels)

  return Trainer(graphdef, tx, train_chunk, accuracy)


def run(config: Config, *, log: Callable[[str], Any] | None = print
        ) -> dict[str, Any]:
  """Trains one model and evaluates it on the test split.

  Args:
    config: the run.
    log: called with a progress line every `config.log_every` steps (None:
      silent).

  Returns:
    `accuracy` (test top-1), `clip_fraction` (mean over steps of the
    fraction of units clipped; 0 without AGC), `final_clip_fraction` and
    `final_loss` (means over the last `log_every` steps), `losses` and
    `clip_fractions` (float32 [steps]), `num_params` and `seconds` (wall
    time, compilation included).
  """
  start = time.perf_counter()
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  t = trainer(dataclasses.replace(config, seed=0))
  params = init_params(config, init_key)
  state = TrainState(params, t.tx.init(params), jnp.zeros([], jnp.int32))
  losses, fracs = [], []
  while len(losses) < config.steps:
    length = min(config.log_every, config.steps - len(losses))
    state, chunk_losses, chunk_fracs = t.train_chunk(state, data_key, length)
    losses += np.asarray(chunk_losses).tolist()
    fracs += np.asarray(chunk_fracs).tolist()
    if log is not None:
      log(f"lambda={config.clipping:g} seed={config.seed} "
          f"step {len(losses):5d}  loss {np.mean(chunk_losses):.4f}  "
          f"clip fraction {np.mean(chunk_fracs):.3f}")
  losses, fracs = np.asarray(losses, np.float32), np.asarray(fracs, np.float32)
  tail = min(config.log_every, config.steps)
  return {
      "accuracy": float(t.accuracy(state.params)),
      "clip_fraction": float(fracs.mean()),
      "final_clip_fraction": float(fracs[-tail:].mean()),
      "final_loss": float(losses[-tail:].mean()),
      "losses": losses,
      "clip_fractions": fracs,
      "num_params": sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
      "seconds": time.perf_counter() - start,
  }


def sweep(config: Config, clippings: Sequence[float], seeds: Sequence[int],
          *, log: Callable[[str], Any] | None = print
          ) -> list[dict[str, Any]]:
  """`run` for every (lambda, seed); one summary row per run."""
  rows = []
  for clipping in clippings:
    for seed in seeds:
      result = run(dataclasses.replace(config, clipping=clipping, seed=seed),
                   log=log)
      rows.append({"clipping": clipping, "seed": seed,
                   **{k: result[k] for k in (
                       "accuracy", "final_loss", "clip_fraction",
                       "final_clip_fraction", "seconds")}})
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """One line per lambda: means over its seeds (accuracy also min-max), the
  wall time summed (the first seed's includes compiling)."""
  lines = ["| λ | seeds | test accuracy (mean, min–max) | final train loss "
           "| clip fraction (mean, last steps) | wall time, all seeds (s) |",
           "|---|---|---|---|---|---|"]
  for clipping in dict.fromkeys(r["clipping"] for r in rows):
    group = [r for r in rows if r["clipping"] == clipping]
    acc = np.array([r["accuracy"] for r in group])
    seeds = ",".join(str(r["seed"]) for r in group)
    mean = lambda k: float(np.mean([r[k] for r in group]))  # noqa: E731
    lines.append(
        f"| {'off' if clipping <= 0 else f'{clipping:g}'} | {seeds} "
        f"| {100 * acc.mean():.1f}% ({100 * acc.min():.1f}–"
        f"{100 * acc.max():.1f}) | {mean('final_loss'):.3f} "
        f"| {mean('clip_fraction'):.3f}, {mean('final_clip_fraction'):.3f} "
        f"| {sum(r['seconds'] for r in group):.0f} |")
  return "\n".join(lines)


def write(rows: Sequence[dict[str, Any]], path: pathlib.Path,
          command: str) -> None:
  """Writes the table: `.csv` one row per run, else Markdown; first line
  (a comment) is the command that made it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="") as f:
    if path.suffix == ".csv":
      f.write(f"# {command}\n")
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    else:
      f.write(f"<!-- {command} -->\n\n{markdown_table(rows)}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line; defaults are `Config`'s and the docs' sweep."""
  d = Config()
  p = argparse.ArgumentParser(
      prog="python -m examples.vit_agc", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--batch_size", type=int, default=d.batch_size)
  p.add_argument("--learning_rate", type=float, default=d.learning_rate)
  p.add_argument("--clipping", type=float, nargs="+",
                 default=[0.0, 0.01, 0.03, 0.1, 0.3, 1.0],
                 help="AGC lambdas to sweep; 0 = no AGC")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
  p.add_argument("--width", type=int, default=d.width)
  p.add_argument("--depth", type=int, default=d.depth)
  p.add_argument("--heads", type=int, default=d.heads)
  p.add_argument("--weight_decay", type=float, default=d.weight_decay)
  p.add_argument("--warmup_fraction", type=float, default=d.warmup_fraction)
  p.add_argument("--log_every", type=int, default=d.log_every)
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="also write the table here (.csv: one row per run)")
  args = p.parse_args(argv)
  for name in ("steps", "batch_size", "width", "depth", "heads", "log_every"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be > 0, got {getattr(args, name)}")
  if args.batch_size > sources.DIGITS_NUM_EXAMPLES - sources.DIGITS_NUM_TEST:
    p.error("--batch_size must be at most the 1437 training images")
  if args.width % args.heads:
    p.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
  if not 0 <= args.warmup_fraction < 1:
    p.error(f"--warmup_fraction must be in [0, 1), got {args.warmup_fraction}")
  if any(c < 0 for c in args.clipping):
    p.error(f"--clipping values must be >= 0 (0 = off), got {args.clipping}")
  return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs the sweep of the command line; returns one summary row per run."""
  args = parse_args(argv)
  config = Config(steps=args.steps, batch_size=args.batch_size,
                  learning_rate=args.learning_rate, width=args.width,
                  depth=args.depth, heads=args.heads,
                  weight_decay=args.weight_decay,
                  warmup_fraction=args.warmup_fraction, log_every=args.log_every)
  print(f"ViT width {config.width}, depth {config.depth}, {config.heads} "
        f"heads; AdamW lr {config.learning_rate:g}, batch "
        f"{config.batch_size}, {config.steps} steps; lambdas {args.clipping}, "
        f"seeds {args.seeds}", flush=True)
  rows = sweep(config, args.clipping, args.seeds,
               log=lambda line: print(line, flush=True))
  print(markdown_table(rows))
  if args.out is not None:
    write(rows, args.out, "python -m examples.vit_agc " + " ".join(
        sys.argv[1:] if argv is None else argv))
  return rows


if __name__ == "__main__":
  main()
