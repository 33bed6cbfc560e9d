"""Semantic segmentation: a normalizer-free decoder on a backbone's features.

The task is drawn by the example itself: discs, squares and triangles, each
class in its own fill pattern (a disc striped across, a square striped down,
a checkered triangle) and a random colour, a few per image on Gaussian noise
(`draw_image`). The patterns alternate `+colour` and `-colour`, so no single
pixel tells a shape from the background: the class of a pixel is in its
neighbourhood, which the backbone's maps see, and its boundary in the
shallow maps.

The backbone is any `nj.create_model` name with `features_only=True`
(random weights, or `--pretrained` ones); the segmenter is one
`hk.transform_with_state`: the backbone's Haiku module called with
`return_features=True`, then `Decoder`, a U-Net-like top-down path that is
normalizer-free as the backbone is: Scaled-WS convolutions (`nj.WSConv2D`)
after gamma-scaled activations (`nj.get_activation`), bilinear upsampling and
a skip connection from every map. The backbone's params come from the
`Model`, the decoder's from its own init. The optimizer is Adam after
`nj.adaptive_grad_clip` (every parameter but the pixel classifier's kernel,
`nj.agc_mask`); `--freeze_backbone` trains the decoder alone
(`optax.partition` gives the backbone `optax.set_to_zero()`).

Usage, from the repository root:
  python -m examples.segmentation        # 96% test pixel accuracy, ~100 s
  python -m examples.segmentation --model nf_regnet_b1 \\
      --pretrained nf_regnet_b1.safetensors --freeze_backbone
  python -m examples.segmentation --image_size 32 --widths 16 32 64 \\
      --depths 1 1 1 --decoder_width 16 --shapes 2 --steps 150 \\
      --log_every 50                     # tiny: 95%, ~35 s

The default backbone is an NF-RegNet-B0 layout at widths 24-48-96-192 (1, 2,
2, 2 blocks), trained with the decoder from random weights on 64 px images,
400 steps of batch 16. A run prints the parameter counts and the backbone's
maps, a loss line every `--log_every` steps, and the test pixel accuracy and
per-class IoU (`tests/examples/test_segmentation.py` runs the tiny setting).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nfnets_jax as nj

# Mask values: 0 the background, then one shape (and fill pattern) each.
CLASSES = ("background", "striped disc", "striped square",
           "checkered triangle")
# Shape radii as fractions of the image side; stripe and check period (px).
MIN_RADIUS, MAX_RADIUS = 0.15, 0.3
PERIOD = 4
DECODER = "decoder"
CLASSIFIER = f"{DECODER}/classifier"  # (Made in `Decoder.__call__`.)


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run.

  Attributes:
    model: the backbone, an `nj.list_models()` name.
    widths, depths: stage widths and blocks per stage of a custom variant
      of `model`, an NF-RegNet (`backbone_overrides`); None: the name's
      own.
    pretrained: a checkpoint for the backbone (`nj.create_model`), or None
      for random weights.
    freeze_backbone: train the decoder only.
    image_size: image side in pixels.
    shapes: shapes drawn per image.
    decoder_width: channels of every decoder level.
    steps: optimizer steps.
    batch_size: images per step (new ones every step).
    learning_rate: Adam's peak learning rate (cosine decay to 0).
    clipping: AGC's lambda; 0 means no AGC.
    test_size: test images (drawn once from their own key).
    seed: the run's one seed.
    log_every: steps between progress lines (and host syncs).
  """
  model: str = "nf_regnet_b0"
  widths: tuple[int, ...] | None = (24, 48, 96, 192)
  depths: tuple[int, ...] | None = (1, 2, 2, 2)
  pretrained: str | None = None
  freeze_backbone: bool = False
  image_size: int = 64
  shapes: int = 3
  decoder_width: int = 32
  steps: int = 400
  batch_size: int = 16
  learning_rate: float = 1e-2
  clipping: float = 0.1
  test_size: int = 128
  seed: int = 0
  log_every: int = 100


# ---------------------------------------------------------------------------
# The synthetic task.
# ---------------------------------------------------------------------------


def draw_image(key: jax.Array, image_size: int, shapes: int
               ) -> tuple[jax.Array, jax.Array]:
  """One image and its mask.

  Each shape has a random class, centre, radius (`MIN_RADIUS` to
  `MAX_RADIUS` of the side) and colour (each channel +-0.6 to 1.2), drawn
  in its class's outline and fill pattern (`CLASSES`): a disc striped
  across, a square striped down, a checkered triangle, stripes and checks
  `PERIOD` pixels long at a random phase. The pattern alternates `+colour`
  and `-colour`, so a shape's mean is the background's; N(0, 0.3) noise
  covers everything.

  Returns:
    `(image float32 [S, S, 3], mask int32 [S, S])`, mask values indexing
    `CLASSES`.
  """
  keys = jax.random.split(key, 7)
  s = float(image_size)
  kind = jax.random.randint(keys[0], (shapes,), 1, len(CLASSES))
  radius = jax.random.uniform(keys[1], (shapes,), minval=s * MIN_RADIUS,
                              maxval=s * MAX_RADIUS)
  centre = jax.random.uniform(keys[2], (shapes, 2), minval=0.15 * s,
                              maxval=0.85 * s)
  colour = (jax.random.uniform(keys[3], (shapes, 3), minval=0.6, maxval=1.2)
            * jnp.where(jax.random.bernoulli(keys[4], 0.5, (shapes, 3)),
                        1.0, -1.0))
  phase = jax.random.randint(keys[5], (shapes, 2), 0, PERIOD)
  y, x = jnp.mgrid[:image_size, :image_size]
  image = 0.3 * jax.random.normal(keys[6], (image_size, image_size, 3))
  mask = jnp.zeros((image_size, image_size), jnp.int32)
  for i in range(shapes):
    dy, dx, r = y + 0.5 - centre[i, 0], x + 0.5 - centre[i, 1], radius[i]
    rows = (y + phase[i, 0]) % PERIOD < PERIOD // 2
    cols = (x + phase[i, 1]) % PERIOD < PERIOD // 2
    inside, on = jnp.select(
        jnp.stack([kind[i] == 1, kind[i] == 2]),
        jnp.stack([jnp.stack([dx**2 + dy**2 <= r**2, rows]),
                   jnp.stack([jnp.maximum(jnp.abs(dx), jnp.abs(dy))
                              <= 0.85 * r, cols])]),
        # An upward triangle: apex at -r, base (width 2r) at +r.
        jnp.stack([(jnp.abs(dy) <= r) & (2 * jnp.abs(dx) <= dy + r),
                   rows ^ cols]))
    mask = jnp.where(inside, kind[i], mask)
    image = jnp.where(inside[..., None],
                      image + jnp.where(on[..., None], 1.0, -1.0) * colour[i],
                      image)
  return image, mask


def draw_batch(key: jax.Array, batch_size: int, image_size: int, shapes: int
               ) -> tuple[jax.Array, jax.Array]:
  """`draw_image` for `batch_size` keys split from `key`: images
  `[B, S, S, 3]` and masks `[B, S, S]`."""
  return jax.vmap(lambda k: draw_image(k, image_size, shapes))(
      jax.random.split(key, batch_size))


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------


class Decoder(hk.Module):
  """A normalizer-free U-Net-like decoder over a backbone's feature maps.

  From the deepest map up: upsample (bilinear) to the next shallower map's
  size, concatenate that map (the skip connection), `WSConv2D` 3x3 after a
  gamma-scaled activation; at the end upsample to the image and classify
  every pixel with a 1x1 conv ('classifier', zero-initialised). The
  backbone's maps are taken before their activation (`feature_info`), so
  every conv here sees `act(x)` as the backbone's convs do, and concatenating
  unit-variance maps keeps unit variance: no normalization needed.
  """

  def __init__(self, num_classes: int, width: int,
               activation: str = "relu", name: str = DECODER):
    super().__init__(name=name)
    self.num_classes = num_classes
    self.width = width
    self.activation = nj.get_activation(activation)

  def __call__(self, features: Sequence[jax.Array],
               image_size: tuple[int, int]) -> jax.Array:
    """NHWC maps, shallowest first -> logits `[N, *image_size, classes]`."""
    x = features[-1]
    for level, skip in reversed(list(enumerate(features[:-1]))):
      x = jax.image.resize(x, (*skip.shape[:3], x.shape[-1]), "bilinear")
      x = jnp.concatenate([x, skip], axis=-1)
      x = nj.WSConv2D(self.width, 3, name=f"up{level}")(self.activation(x))
    x = jax.image.resize(x, (x.shape[0], *image_size, x.shape[-1]),
                         "bilinear")
    return hk.Conv2D(self.num_classes, 1, w_init=jnp.zeros,
                     name="classifier")(self.activation(x))


def make_network(backbone: nj.Model, decoder_width: int
                 ) -> hk.TransformedWithState:
  """`forward(images, is_training) -> logits [N, S, S, len(CLASSES)]`.

  The backbone's Haiku module, built as `backbone` was (so its params fit),
  called with `return_features=True`, then `Decoder` on its maps.
  """
  def forward(images: jax.Array, is_training: bool) -> jax.Array:
    net = nj.build_model(backbone.family, backbone.num_classes,
                         **backbone.model_kwargs)
    features = net(images, is_training=is_training,
                   return_features=True)["features"]
    return Decoder(len(CLASSES), decoder_width)(features, images.shape[1:3])
  return hk.transform_with_state(forward)


def init_decoder(config: Config, backbone: nj.Model, key: jax.Array
                 ) -> hk.Params:
  """The decoder's params, initialized on zero maps shaped as the backbone's
  for `config.image_size` images (traced: `jax.eval_shape`)."""
  size = config.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  maps = [jnp.zeros(m.shape, m.dtype) for m in jax.eval_shape(
      backbone.forward, backbone.params, backbone.state, images)]
  init = hk.transform(lambda maps: Decoder(
      len(CLASSES), config.decoder_width)(maps, (size, size))).init
  # Run once: compiled without the LLVM passes that pay off only for
  # programs run many times (`nj.cpu.compiler_options`).
  return jax.jit(init, compiler_options=nj.cpu.compiler_options(fast=True))(
      key, maps)


def backbone_overrides(config: Config) -> dict[str, Any]:
  """`nj.create_model` arguments for `config.widths`/`config.depths`: a
  custom NF-RegNet variant (width multiplier 1), or none.

  Raises:
    ValueError: only one of widths and depths, or a model that is not an
      NF-RegNet.
  """
  if config.widths is None and config.depths is None:
    return {}
  if config.widths is None or config.depths is None:
    raise ValueError("widths and depths go together; got "
                     f"widths={config.widths}, depths={config.depths}")
  if not config.model.startswith("nf_regnet_"):
    raise ValueError(f"widths/depths make a custom NF-RegNet; model="
                     f"{config.model!r} is not one (allowed: nf_regnet_b0 "
                     "... nf_regnet_b8, or no widths/depths)")
  size = config.image_size
  return {"variant": {"width": config.widths, "depth": config.depths,
                      "train_imsize": size, "test_imsize": size,
                      "drop_rate": 0.0},
          "width": 1.0}


def create_backbone(config: Config) -> nj.Model:
  """`nj.create_model(config.model, features_only=True, ...)`: random
  weights from the seed, or `config.pretrained`'s."""
  return nj.create_model(
      config.model, pretrained=config.pretrained or False, features_only=True,
      # The network's classifier goes unused: the smallest one for random
      # weights, the checkpoint's for pretrained ones.
      num_classes=None if config.pretrained else 1, seed=config.seed,
      **backbone_overrides(config))


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


def param_labels(params: hk.Params) -> Any:
  """'decoder' for the decoder's params, 'backbone' for the others (a tree
  like `params`, for `optax.partition`)."""
  return {module: jax.tree.map(
      lambda _, m=module: "decoder" if m.split("/")[0] == DECODER
      else "backbone", leaves) for module, leaves in params.items()}


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """AGC (if `config.clipping` > 0) on the raw gradient, then Adam.

  AGC clips every parameter but the pixel classifier's kernel (`nj.agc_mask`
  with `CLASSIFIER`).
  Adam's learning rate decays from `config.learning_rate` to 0 (cosine);
  with `config.freeze_backbone` the backbone's updates are zero
  (`optax.set_to_zero`), so only the decoder trains.
  """
  adam = optax.adam(optax.cosine_decay_schedule(config.learning_rate,
                                                config.steps))
  tx = optax.partition(
      {"decoder": adam,
       "backbone": optax.set_to_zero() if config.freeze_backbone else adam},
      param_labels)
  if config.clipping <= 0:
    return tx
  agc = optax.masked(nj.adaptive_grad_clip(config.clipping),
                     functools.partial(nj.agc_mask,
                                       classifier_module=CLASSIFIER))
  return optax.chain(agc, tx)


class TrainState(NamedTuple):
  """Everything that changes during training.

  Attributes:
    params: backbone and decoder params (Haiku).
    state: Haiku state (empty for the NF backbones).
    opt_state: the optimizer's state.
    step: int32 scalar, steps taken.
  """
  params: hk.Params
  state: hk.State
  opt_state: optax.OptState
  step: jax.Array


def pixel_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over every pixel."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, masks).mean()


def make_train_chunk(config: Config, net: hk.TransformedWithState,
                     tx: optax.GradientTransformation
                     ) -> Callable[[TrainState, jax.Array, int],
                                   tuple[TrainState, jax.Array]]:
  """A jitted `(state, key, length) -> (state, losses [length])`.

  It takes `length` steps in one `lax.scan`; step s draws a new batch and
  its stochastic-depth key from `fold_in(key, s)`.
  """
  def step(train: TrainState, key: jax.Array):
    data_key, rng = jax.random.split(jax.random.fold_in(key, train.step))
    images, masks = draw_batch(data_key, config.batch_size,
                               config.image_size, config.shapes)

    def loss_fn(params):
      logits, state = net.apply(params, train.state, rng, images,
                                is_training=True)
      return pixel_loss(logits, masks), state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train.params)
    updates, opt_state = tx.update(grads, train.opt_state, train.params)
    params = optax.apply_updates(train.params, updates)
    return TrainState(params, state, opt_state, train.step + 1), loss

  @functools.partial(nj.cpu.jit, static_argnums=2, donate_argnums=0)
  def train_chunk(train: TrainState, key: jax.Array, length: int):
    return jax.lax.scan(lambda t, _: step(t, key), train, None,
                        length=length)

  return train_chunk


def evaluate(net: hk.TransformedWithState, params: hk.Params,
             state: hk.State, images: jax.Array, masks: jax.Array
             ) -> dict[str, Any]:
  """Pixel accuracy and per-class IoU (eval mode) on `images`, `masks`."""
  logits, _ = jax.jit(functools.partial(net.apply, is_training=False))(
      params, state, None, images)
  pred = np.asarray(jnp.argmax(logits, axis=-1))
  masks = np.asarray(masks)
  iou = {}
  for c, name in enumerate(CLASSES):
    union = np.sum((pred == c) | (masks == c))
    iou[name] = float(np.sum((pred == c) & (masks == c)) / max(union, 1))
  return {"pixel_accuracy": float(np.mean(pred == masks)), "iou": iou}


def run(config: Config, *, log: Callable[[str], Any] | None = print
        ) -> dict[str, Any]:
  """Trains the segmenter and evaluates it on `config.test_size` images.

  Args:
    config: the run.
    log: called with the parameter counts and a progress line every
      `config.log_every` steps (None: silent).

  Returns:
    `pixel_accuracy` and `iou` (per class) on the test images, `losses`
    (float32 [steps]), `final_loss` (mean of the last `log_every` steps),
    `backbone_params`, `decoder_params`, `params` (the trained ones),
    `feature_info` (the backbone's maps) and `seconds` (wall time,
    compilation included).
  """
  start = time.perf_counter()
  init_key, data_key, test_key = jax.random.split(
      jax.random.key(config.seed), 3)
  backbone = create_backbone(config)
  decoder = init_decoder(config, backbone, init_key)
  counts = {"backbone": nj.count_params(backbone.params),
            "decoder": nj.count_params(decoder)}
  if log is not None:
    maps = [(f.module, f.channels, f.reduction)
            for f in backbone.feature_info]
    log(f"backbone {backbone.name}: {counts['backbone']:,} params, maps "
        f"{maps} ({'frozen' if config.freeze_backbone else 'fine-tuned'}); "
        f"decoder: {counts['decoder']:,} params")
  net = make_network(backbone, config.decoder_width)
  params = {**backbone.params, **decoder}
  tx = make_optimizer(config)
  train = TrainState(params, backbone.state, tx.init(params),
                     jnp.zeros([], jnp.int32))
  train_chunk = make_train_chunk(config, net, tx)
  losses = []
  while len(losses) < config.steps:
    length = min(config.log_every, config.steps - len(losses))
    train, chunk = train_chunk(train, data_key, length)
    losses += np.asarray(chunk).tolist()
    if log is not None:
      log(f"step {len(losses):5d}  loss {np.mean(chunk):.4f}")
  test_images, test_masks = draw_batch(test_key, config.test_size,
                                       config.image_size, config.shapes)
  result = evaluate(net, train.params, train.state, test_images, test_masks)
  losses = np.asarray(losses, np.float32)
  return {
      **result,
      "losses": losses,
      "final_loss": float(losses[-min(config.log_every, config.steps):]
                          .mean()),
      "backbone_params": counts["backbone"],
      "decoder_params": counts["decoder"],
      "params": train.params,
      "feature_info": backbone.feature_info,
      "seconds": time.perf_counter() - start,
  }


def parse_args(argv: Sequence[str] | None) -> Config:
  """The command line as a `Config`; defaults are `Config`'s.

  The backbone is the custom NF-RegNet of `--widths`/`--depths` when given,
  else the name's own network with `--pretrained` or
  `--no_custom_variant`, else `Config`'s custom one.
  """
  d = Config()
  p = argparse.ArgumentParser(
      prog="python -m examples.segmentation", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=d.model,
                 help="backbone: an nj.list_models() name")
  p.add_argument("--widths", type=int, nargs="+", default=None,
                 help=f"custom NF-RegNet stage widths (with --depths; "
                 f"default {d.widths} without --pretrained)")
  p.add_argument("--depths", type=int, nargs="+", default=None,
                 help=f"custom NF-RegNet blocks per stage (with --widths; "
                 f"default {d.depths} without --pretrained)")
  p.add_argument("--no_custom_variant", action="store_true",
                 help="the model name's own network (as with --pretrained)")
  p.add_argument("--pretrained", default=None,
                 help="backbone checkpoint (any nj.create_model format)")
  p.add_argument("--freeze_backbone", action="store_true",
                 help="train the decoder only")
  for name in ("image_size", "shapes", "decoder_width", "steps",
               "batch_size", "test_size", "seed", "log_every"):
    p.add_argument(f"--{name}", type=int, default=getattr(d, name))
  p.add_argument("--learning_rate", type=float, default=d.learning_rate)
  p.add_argument("--clipping", type=float, default=d.clipping,
                 help="AGC lambda; 0 = no AGC")
  args = p.parse_args(argv)
  for name in ("image_size", "shapes", "decoder_width", "steps",
               "batch_size", "test_size", "log_every"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be > 0, got {getattr(args, name)}")
  if args.clipping < 0:
    p.error(f"--clipping must be >= 0 (0 = off), got {args.clipping}")
  if args.widths is None and args.depths is None and not (
      args.no_custom_variant or args.pretrained):
    args.widths, args.depths = d.widths, d.depths
  if (args.widths is None) != (args.depths is None) or (
      args.widths is not None and len(args.widths) != len(args.depths)):
    p.error(f"--widths {args.widths} and --depths {args.depths}: give both, "
            "of the same length")
  if args.pretrained is not None and not os.path.exists(args.pretrained):
    p.error(f"--pretrained {args.pretrained}: no such file or directory")
  return Config(
      model=args.model,
      widths=None if args.widths is None else tuple(args.widths),
      depths=None if args.depths is None else tuple(args.depths),
      pretrained=args.pretrained, freeze_backbone=args.freeze_backbone,
      image_size=args.image_size, shapes=args.shapes,
      decoder_width=args.decoder_width, steps=args.steps,
      batch_size=args.batch_size, learning_rate=args.learning_rate,
      clipping=args.clipping, test_size=args.test_size, seed=args.seed,
      log_every=args.log_every)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains and evaluates the run of the command line; returns `run`'s."""
  config = parse_args(argv)
  result = run(config, log=lambda line: print(line, flush=True))
  iou = ", ".join(f"{k} {v:.3f}" for k, v in result["iou"].items())
  print(f"test pixel accuracy {100 * result['pixel_accuracy']:.1f}% "
        f"(IoU: {iou}) in {result['seconds']:.0f} s")
  return result


if __name__ == "__main__":
  main()
