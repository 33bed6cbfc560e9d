"""`nfnets-predict`: classify image files with a pretrained model.

Each image is read as the RGB picture a person sees (`data.images.
read_rgb`: 16-bit scaled to 8 bits, transparency over white, EXIF
orientation applied), preprocessed exactly as the evaluation pipeline does
(`DataConfig.preprocess`: bicubic resize to test size + crop padding, center
crop, ImageNet normalization) and classified; one line per image gives its top-k
labels with softmax probabilities. An image that cannot be read, or is over
PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), is named on
stderr in one line, the others are still classified, and the exit status is
then 1.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
import json
import os
import sys
from typing import Any

import numpy as np

from nfnets_jax.cli import compile_cache
from nfnets_jax.cli import errors
from nfnets_jax.cli import forward_cache
from nfnets_jax.cpu import malloc
from nfnets_jax.data import images
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import export

PROG = "nfnets-predict"
EXIT_UNREADABLE = 1
DESCRIPTION = f"""\
Classify images with a pretrained NFNet (or any model of
nfnets_jax.list_models()) and print the top-k labels with probabilities,
one line per image: `PATH: label (p%), label (p%), ...`, or with --json one
object per line: {{"path": ..., "top": [{{"label", "index", "prob"}}, ...]}}.

--pretrained takes an official F*_haiku.npz, a safe .npz, a timm NF
model's .safetensors / .pth (dm_nfnet_*, eca_nfnet_l0, nfnet_l0,
nf_resnet50, nf_regnet_b1, ...), an nfnets-train workdir (its newest
checkpoint, EMA weights when kept) or an artifact of nfnets_jax.export().
The model is inferred from the checkpoint where it can be (NFNet params, a
timm file's keys and shapes, a workdir's config, an export); --model names
it otherwise or overrides it (e.g. dm_nfnet_f0 for timm's definition of
converted weights).

Labels: the ImageNet synsets for 1000-class models, the class folder names
of a model fine-tuned on an image folder, indices otherwise.

Images: any file PIL reads; 16-bit images are scaled to 8 bits, transparent
pixels shown over white, EXIF orientation applied. An image over PIL's
decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) is refused unread.

Exit status: 0; 1 when some image could not be read or was refused (each is
named on stderr, the others are classified); 2 for a bad checkpoint or
argument.

examples:
  {PROG} --pretrained F0_haiku.npz cat.jpg dog.png
  {PROG} --pretrained dm_nfnet_f0.safetensors --top-k 3 *.jpg
  {PROG} --pretrained /tmp/run --json photos/*.jpg
  {PROG} --pretrained f0.nfx img.jpg      # written by nfnets_jax.export()
"""


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description=DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("images", nargs="+", metavar="IMAGE",
                      help="image files (anything PIL reads)")
  parser.add_argument("--pretrained", required=True, metavar="CKPT",
                      help="checkpoint file, nfnets-train workdir or "
                      "exported artifact")
  parser.add_argument("--model", default=None, metavar="NAME",
                      help="registry name (default: inferred from CKPT)")
  parser.add_argument("--top-k", type=int, default=5, metavar="K",
                      help="labels per image (default 5)")
  parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                      help="images per forward pass (default 16)")
  parser.add_argument("--json", action="store_true",
                      help="one JSON object per line instead of text")
  parser.add_argument("--verbose", action="store_true",
                      help="tracebacks for errors")
  return parser


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 `[H, W, 3]` RGB: `data.images.read_rgb`.

  Raises:
    images.ImageDecodeError: naming the path; `images.ImageTooLargeError`
      for an image over PIL's decompression-bomb limit.
  """
  return images.read_rgb(path)


def load_predictor(pretrained: str, model_name: str | None,
                   forwards: str | None = None) -> Any:
  """A `Model`, `ExportedModel` or `forward_cache.CachedPredictor` (each:
  callable, `data_config`, `label_names`).

  Args:
    pretrained, model_name: `--pretrained`, `--model`.
    forwards: a folder of `forward_cache` (None: the model is traced).
  """
  if export.is_exported(pretrained):
    if model_name is not None:
      raise errors.UsageError(f"--model={model_name!r}: an exported artifact "
                           "fixes its model; leave --model unset")
    return export.load_exported(pretrained)
  if forwards is not None:
    return forward_cache.load_predictor(forwards, pretrained, model_name)
  return create.create_model(model_name, pretrained=pretrained)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def classify(predictor: Any, images: Sequence[np.ndarray], batch_size: int
             ) -> np.ndarray:
  """Softmax probabilities `[N, classes]` of preprocessed images.

  A fixed-batch export gets its batches padded (the padding is dropped).
  """
  fixed = getattr(predictor, "batch_size", None)
  size = fixed or batch_size
  probs = []
  for chunk in _batches(list(images), size):
    x = np.stack(chunk)
    n = len(x)
    if fixed and n < fixed:
      x = np.concatenate([x, np.zeros((fixed - n,) + x.shape[1:], x.dtype)])
    logits = np.asarray(predictor(x), np.float64)[:n]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    probs.append(p / p.sum(axis=1, keepdims=True))
  return np.concatenate(probs)


def top_k(probs: np.ndarray, k: int, label_names: Sequence[str] | None
          ) -> list[dict[str, Any]]:
  """The `k` most probable classes of one `[classes]` row."""
  order = np.argsort(-probs, kind="stable")[:k]
  return [{"label": (label_names[i] if label_names is not None else str(i)),
           "index": int(i), "prob": float(probs[i])} for i in order]


def format_line(path: str, top: Sequence[dict[str, Any]], as_json: bool
                ) -> str:
  if as_json:
    return json.dumps({"path": path, "top": list(top)})
  return f"{path}: " + ", ".join(f"{t['label']} ({100 * t['prob']:.1f}%)"
                                 for t in top)


def run(argv: Sequence[str] | None = None, cache: str | None = None) -> int:
  """The command; returns the exit status (see the module docstring).

  Args:
    argv: the arguments.
    cache: the compilation cache's folder (`compile_cache.enable`), where
      traced forwards are kept too (`forward_cache`); None: not kept.
  """
  args = make_parser().parse_args(argv)
  if args.top_k < 1:
    raise errors.UsageError(f"--top-k={args.top_k} must be >= 1")
  if args.batch_size < 1:
    raise errors.UsageError(f"--batch-size={args.batch_size} must be >= 1")
  forwards = (None if cache is None
              else os.path.join(cache, forward_cache.SUBFOLDER))
  predictor = load_predictor(args.pretrained, args.model, forwards)
  paths, inputs, failed = [], [], 0
  for path in args.images:
    try:
      image = read_image(path)
    except images.ImageDecodeError as e:  # Undecodable or too large.
      failed += 1
      print(f"{PROG}: cannot read image {path}: {e.reason}", file=sys.stderr)
      continue
    inputs.append(predictor.data_config.preprocess(image))
    paths.append(path)
  if inputs:
    probs = classify(predictor, inputs, args.batch_size)
    k = min(args.top_k, probs.shape[1])
    for path, row in zip(paths, probs):
      print(format_line(path, top_k(row, k, predictor.label_names),
                        args.json), flush=True)
  return EXIT_UNREADABLE if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point: `run` behind `errors.guard` (bad input -> exit 2)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  malloc.tune()  # Opt-in (NFNETS_JAX_MALLOC=1); before JAX starts.
  cache = compile_cache.enable()  # NFNETS_JAX_COMPILE_CACHE=0 turns it off.
  return errors.guard(PROG, lambda: run(argv, cache), argv=argv)


if __name__ == "__main__":
  sys.exit(main())
