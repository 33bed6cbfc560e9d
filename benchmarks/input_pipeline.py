"""Host input pipeline of the NFNet recipe, images/s on one core.

Writes `--images` JPEGs of ImageNet's typical size (375 x 500, quality 90,
smooth shapes plus noise), then, in this one process and thread, times:
  - baseline: PIL decode + random crop + PIL bicubic resize to `--size` +
    flip (what a plain PyTorch-style loader does per image);
  - ours: the F0 recipe's host work per training image: decode
    (`data.images.read_rgb`, as the image-folder dataset reads) and the
    recipe's `TrainBatch` (Inception crop, flip, TF bicubic resize, MixUp +
    CutMix over pairs of images, RandAugment 4 layers at magnitude 5 in
    'official' mode, normalization), with a per-stage split.
  - ours with `train.augment.on_device` (the NFNet recipes' setting): the
    host decodes, crops, flips, resizes and draws the random choices;
    MixUp/CutMix, RandAugment and normalization run in the jitted train
    step, timed here on its own for one batch, beside F0's train step on
    the same CPU (its share of the step).
Each is run `--repeats` times interleaved; the best run counts (the others
differ by what else the machine did). It prints images/s per core, the ratio
to the baseline, and the 1-minute load before and after.

Usage:
  python benchmarks/input_pipeline.py                 # 192 px (F0)
  python benchmarks/input_pipeline.py --size 320 --magnitude 15   # F3
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import pathlib
import sys
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=wrong-import-position
from nfnets_jax.cpu import compiler  # noqa: E402
from nfnets_jax.data import device_augment  # noqa: E402
from nfnets_jax.data import images as images_lib  # noqa: E402
from nfnets_jax.data import mixing  # noqa: E402
from nfnets_jax.data import pipeline  # noqa: E402
from nfnets_jax.data import preprocessing  # noqa: E402
from nfnets_jax.data import randaugment  # noqa: E402
from nfnets_jax.experiment import parallel  # noqa: E402
from nfnets_jax.experiment import recipes  # noqa: E402
from nfnets_jax.experiment import train_state  # noqa: E402
from nfnets_jax.models import families  # noqa: E402
from nfnets_jax.optim import optimizers  # noqa: E402

HEIGHT, WIDTH = 375, 500


def write_jpegs(folder: pathlib.Path, count: int, seed: int = 0
                ) -> list[pathlib.Path]:
  """`count` 375 x 500 JPEGs with photo-like content (smooth + texture)."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    low = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((WIDTH, HEIGHT),
                                                    Image.BICUBIC), np.float32)
    texture = rng.normal(0, 12, size=(HEIGHT, WIDTH, 3))
    pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
    path = folder / f"{i:04d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    paths.append(path)
  return paths


def baseline(paths: Sequence[pathlib.Path], size: int,
             rng: np.random.Generator) -> None:
  """PIL: decode, random crop, bicubic resize, flip."""
  for path in paths:
    with Image.open(path) as image:
      image = image.convert("RGB")
      width, height = image.size
      side = int(rng.integers(min(width, height) // 2, min(width, height) + 1))
      left = int(rng.integers(0, width - side + 1))
      top = int(rng.integers(0, height - side + 1))
      image = image.resize((size, size), Image.BICUBIC,
                           box=(left, top, left + side, top + side))
      if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
      np.asarray(image)


def ours(paths: Sequence[pathlib.Path], size: int, batch: int,
         augment: pipeline.Augment, rng: np.random.Generator,
         stages: dict[str, float]) -> None:
  """The recipe's host work, stage by stage (as `pipeline.TrainBatch`)."""
  def timed(name: str, fn: Callable[[], object]) -> object:
    start = time.perf_counter()
    out = fn()
    stages[name] += time.perf_counter() - start
    return out

  for first in range(0, len(paths) - 2 * batch + 1, 2 * batch):
    chunk = paths[first:first + 2 * batch]  # Mixing reads 2B for B.
    decoded = timed("decode", lambda: [images_lib.read_rgb(p) for p in chunk])
    images = timed("crop + flip + resize", lambda: np.stack([
        preprocessing.train_crop_flip_resize(
            image, size, rng, random_crop=True, flip=True, crop_padding=32)
        for image in decoded]))
    labels = np.arange(len(chunk)) % 1000
    images, _, _ = timed("mixup / cutmix", lambda: mixing.mix_batch(
        images, labels, 1000, rng, mixup_alpha=augment.mixup_alpha,
        cutmix_alpha=augment.cutmix_alpha))
    images = timed("randaugment", lambda: np.stack([
        randaugment.randaugment(
            np.clip(image, 0.0, 255.0).astype(np.uint8),
            augment.randaugment_layers, augment.randaugment_magnitude, rng,
            augment.randaugment_mode) for image in images]))
    timed("normalize", lambda: preprocessing.normalize(images))


def ours_on_device(paths: Sequence[pathlib.Path], size: int, batch: int,
                   augment: pipeline.Augment, rng: np.random.Generator,
                   stages: dict[str, float]) -> None:
  """The host's share with `augment.on_device`: decode, then `TrainBatch`
  (crop, flip, resize, and the draws of mixing and RandAugment)."""
  make_batch = pipeline.TrainBatch(size, augment, 1000, 32)
  for first in range(0, len(paths) - 2 * batch + 1, 2 * batch):
    chunk = paths[first:first + 2 * batch]
    start = time.perf_counter()
    examples = [{"image": images_lib.read_rgb(p), "label": i % 1000}
                for i, p in enumerate(chunk)]
    stages["decode"] += time.perf_counter() - start
    start = time.perf_counter()
    make_batch(examples, rng)
    stages["crop + flip + resize + draws"] += time.perf_counter() - start


def device_seconds(size: int, batch: int, augment: pipeline.Augment,
                   repeats: int) -> float:
  """Median seconds of the jitted `device_augment.augment` on one batch."""
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8),
               "label": i} for i in range(2 * batch)]
  host = pipeline.TrainBatch(size, augment, 1000, 32)(examples, rng)
  fn = compiler.jit(functools.partial(
      device_augment.augment, num_layers=augment.randaugment_layers,
      magnitude=augment.randaugment_magnitude, mode=augment.randaugment_mode))
  jax.block_until_ready(fn(host))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(host))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def train_step_seconds(size: int, batch: int, repeats: int) -> float:
  """Median seconds of F0's train step (host-made batch) at `size` px."""
  config = recipes.nfnet_imagenet("F0")
  config.train.global_batch_size = batch
  config.train.compute_dtype = "float32"  # bfloat16 is slow on CPUs.
  net = families.make_network(config.model.name, config.model.kwargs, 1000)
  tx, schedule = optimizers.make_optimizer(
      config.optimizer, batch_size=batch, steps_per_epoch=100,
      total_epochs=10.0)
  mesh = parallel.local_mesh()
  step = train_state.make_train_step(net, tx, schedule, config.train)
  state = parallel.replicate(train_state.init_train_state(
      net, tx, seed=0, image_size=size, use_ema=True), mesh)
  labels = np.arange(batch) % 1000
  data = parallel.shard({
      "images": np.random.default_rng(0).normal(
          size=(batch, size, size, 3)).astype(np.float32),
      "labels": labels.astype(np.int32),
      "soft_labels": np.eye(1000, dtype=np.float32)[labels]}, mesh)
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--size", type=int, default=192)
  parser.add_argument("--magnitude", type=float, default=5.0)
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32,
                      help="training images per mixed batch (2x decoded)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-train-step", action="store_true",
                      help="skip timing F0's train step (for the device "
                      "augmentation's share; about 3 minutes on 2 cores)")
  args = parser.parse_args(argv)
  augment = pipeline.Augment(
      random_crop=True, flip=True, randaugment_layers=4,
      randaugment_magnitude=args.magnitude, mixup_alpha=0.2,
      cutmix_alpha=1.0, randaugment_mode="official")
  device = dataclasses.replace(augment, on_device=True)
  with tempfile.TemporaryDirectory() as folder:
    paths = write_jpegs(pathlib.Path(folder), args.images)
    load_before = os.getloadavg()[0]
    runs = collections.defaultdict(list)
    best_stages = None
    for repeat in range(args.repeats):
      rng = np.random.default_rng(repeat)
      start = time.perf_counter()
      baseline(paths, args.size, rng)
      runs["baseline"].append(len(paths) / (time.perf_counter() - start))
      stages = collections.defaultdict(float)
      start = time.perf_counter()
      ours(paths, args.size, args.batch, augment, rng, stages)
      seconds = time.perf_counter() - start
      # Every decoded image counts once: mixing makes B from 2B.
      done = (len(paths) // (2 * args.batch)) * 2 * args.batch
      runs["ours"].append(done / seconds)
      if runs["ours"][-1] == max(runs["ours"]):
        best_stages = {k: 1e3 * v / done for k, v in stages.items()}
      stages = collections.defaultdict(float)
      start = time.perf_counter()
      ours_on_device(paths, args.size, args.batch, device, rng, stages)
      runs["on_device"].append(done / (time.perf_counter() - start))
      if runs["on_device"][-1] == max(runs["on_device"]):
        device_stages = {k: 1e3 * v / done for k, v in stages.items()}
    load_after = os.getloadavg()[0]
    augment_s = device_seconds(args.size, args.batch, device, 5)
    step_s = (None if args.no_train_step else
              train_step_seconds(args.size, args.batch, 3))
    load_end = os.getloadavg()[0]
  best = {k: max(v) for k, v in runs.items()}
  print(f"{args.images} JPEGs of {WIDTH} x {HEIGHT}, {args.size} px out, "
        f"RandAugment 4 x {args.magnitude:g} ('official'), MixUp 0.2 + "
        f"CutMix 1.0 over pairs; one process, one thread; best of "
        f"{args.repeats}; load {load_before:.2f} before, {load_after:.2f} "
        "after")
  for key, label, stages in (
      ("baseline", "baseline (PIL decode, crop, resize, flip)", None),
      ("ours", "ours (the recipe's host work)", best_stages),
      ("on_device", "ours, train.augment.on_device (host: decode, crop, "
       "flip, resize, draws)", device_stages)):
    ratio = ("" if key == "baseline" else
             f", {best[key] / best['baseline']:.2f} x the baseline")
    print(f"  {label}: {best[key]:.0f} images/s per core (runs "
          f"{', '.join(f'{r:.0f}' for r in runs[key])}){ratio}")
    if stages:
      print("    per decoded image, ms: " + ", ".join(
          f"{k} {v:.2f}" for k, v in stages.items()))
  print(f"  the jitted augmentation of {args.batch} training images on this "
        f"CPU ({jax.device_count()} device): {1e3 * augment_s:.0f} ms")
  if step_s is not None:
    print(f"  F0's train step, batch {args.batch}, {args.size} px, float32: "
          f"{step_s:.2f} s; the augmentation is "
          f"{100 * augment_s / step_s:.1f}% of it (load {load_end:.2f} at the "
          "end)")


if __name__ == "__main__":
  main()
