"""The papers' training recipes as configs (used by the files in configs/).

Per-variant values (resolution, RandAugment, dropout) are read from the model
modules' variant tables, so a config states only the recipe. Each recipe's
`smoke` form keeps the recipe and swaps in a tiny model, tiny images and one
step, so CI runs every config end to end on CPU (with `tfds.testing.mock_data`
standing in for ImageNet).

Sources: the official release's `experiment.py`, `experiment_nfnets.py`,
`experiment_nf_regnets.py` and `dataset.py`
(google-deepmind/deepmind-research/nfnets), and the papers:
Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021; Brock, De, Smith, "Characterizing signal
propagation to close the performance gap in unnormalized ResNets", ICLR 2021.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import config_dict

from nfnets_jax.experiment import config_schema
from nfnets_jax.models import nf_regnet
from nfnets_jax.models import nfnet
from nfnets_jax.pretrained import timm

IMAGENET = "imagenet2012"
# Official: mixup with Beta(0.2, 0.2); CutMix's kept area uniform = Beta(1, 1).
MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0

# Tiny stand-ins for the smoke runs (32x32 images, 16-32 channels, two
# stages: a small program compiles fast on CPU).
SMOKE_NFNET = {"width": (16, 32), "depth": (1, 1)}
SMOKE_REGNET = {"width": (16, 32), "depth": (1, 1)}


def _imagenet_common(config: config_dict.ConfigDict) -> None:
  """ImageNet data, eval and logging settings shared by the recipes."""
  config.dataset.name = IMAGENET
  config.dataset.train_split = "train_and_valid"  # Official: all of train.
  config.dataset.eval_split = "test"  # = ImageNet validation.
  config.dataset.num_workers = 16
  config.train.label_smoothing = 0.1
  config.train.loss = "softmax"
  config.train.log_every_steps = 100
  config.eval.batch_size = 1024
  config.eval.crop_padding = 32
  config.eval.every_steps = 10_000
  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.optimizer.name = "sgd"
  config.optimizer.kwargs = {"momentum": 0.9, "nesterov": True}
  config.optimizer.lr.warmup_epochs = 5.0
  config.optimizer.lr.schedule = "cosine"


def _smoke(config: config_dict.ConfigDict, variant: Any,
           tiny: dict[str, Any]) -> None:
  """One step of a tiny model with the variant's training settings."""
  config_schema.smoke(config)
  kwargs = config.model.kwargs.to_dict()
  kwargs["variant"] = {**dataclasses.asdict(variant), **tiny,
                       "train_imsize": 32, "test_imsize": 32}
  config.model.kwargs = kwargs


# F6 as the paper reports it (86.5%) was trained with SAM (Brock et al.
# 2021, Fig. 1 and Table 2). The NFNet paper's text found here gives no SAM
# settings; these are the SAM paper's ImageNet value (Foret et al., ICLR
# 2021: rho = 0.05) with unsynchronized, per-device perturbations, the
# SAM authors' JAX default (google-research/sam: `sync_perturbations=False`,
# the "m-sharpness" of their Section 4.1).
SAM_F6 = {"rho": 0.05, "sync_perturbations": False}


def nfnet_imagenet(variant: str, arg: str | None = None
                   ) -> config_dict.ConfigDict:
  """NFNet-F0..F7 on ImageNet, the official recipe (`experiment_nfnets.py`).

  Global batch 4096, 360 epochs, lr 0.1 x 4096 / 256 with 5 epochs of linear
  warmup then cosine decay to 0, SGD + Nesterov 0.9, weight decay 2e-5 (not
  on gains/biases), AGC 0.01 / eps 1e-3 on all but the classifier weight,
  label smoothing 0.1, softmax cross-entropy, EMA 0.99999 for evaluation,
  stochastic depth 0.25, the variant's dropout, CutMix + MixUp + RandAugment
  (4 layers, the variant's magnitude), bfloat16 activations, the variant's
  train/test resolution, eval resize to test + 32 then center crop. F6
  adds SAM (`SAM_F6`), as the paper trained it.
  """
  v = nfnet.get_variant(variant)
  config = config_schema.base_config()
  _imagenet_common(config)
  config.model.name = "NFNet"
  config.model.kwargs = {
      "variant": variant,  # Its dropout is the variant's (drop_rate=None).
      "width": 1.0, "se_ratio": 0.5, "alpha": 0.2, "stochdepth_rate": 0.25,
      "activation": "gelu", "final_conv_mult": 2.0, "use_two_convs": True,
      "group_size": 128,
  }
  t = config.train
  t.global_batch_size = 4096
  t.num_epochs = 360.0
  t.image_size = v.train_imsize
  t.augment.random_crop = True
  t.augment.flip = True
  t.augment.randaugment_layers = v.randaugment_layers
  t.augment.randaugment_magnitude = v.randaugment_magnitude
  t.augment.randaugment_mode = "official"  # Fixed pixels, as the TF port.
  t.augment.mixup_alpha = MIXUP_ALPHA
  t.augment.cutmix_alpha = CUTMIX_ALPHA
  t.augment.on_device = True  # The host only decodes, crops and resizes.
  t.ema_decay = 0.99999
  t.ema_warmup = True
  t.compute_dtype = "bfloat16"
  config.eval.image_size = v.test_imsize
  o = config.optimizer
  o.weight_decay = 2e-5
  o.agc.clipping = 0.01
  o.agc.eps = 1e-3
  o.lr.base_lr = 0.1
  o.lr.base_batch_size = 256
  o.lr.end_lr_factor = 0.0
  if variant.upper() == "F6":
    o.sam.update(SAM_F6)
  if "smoke" in config_schema.parse_args(arg):
    # Dropout fixed at F0's so the eight F smoke runs share one compiled
    # step (they still differ in their host-side RandAugment settings).
    _smoke(config, v, {**SMOKE_NFNET, "drop_rate": 0.2})
    config.model.kwargs.group_size = 8
  return config


def nf_regnet_imagenet(variant: str = "B0", arg: str | None = None
                       ) -> config_dict.ConfigDict:
  """NF-RegNet on ImageNet, the official `experiment_nf_regnets.py` recipe.

  Global batch 1024, 360 epochs, lr 0.4 (not scaled by batch), 5 epochs
  warmup then cosine to 0.001, SGD + Nesterov 0.9, weight decay 5e-5 + 1e-5
  per level (B0: 5e-5), no AGC, label smoothing 0.1, EMA 0.99999, MixUp +
  CutMix, float32, width 0.75, expansion 2.25, SE 0.5, stochastic depth 0.1,
  SiLU, the variant's resolution and dropout.
  """
  v = nf_regnet.NF_REGNET_VARIANTS[variant]
  level = int(variant[1:])
  config = config_schema.base_config()
  _imagenet_common(config)
  config.model.name = "NFRegNet"
  config.model.kwargs = {
      "variant": variant,
      "width": 0.75, "expansion": 2.25, "se_ratio": 0.5, "alpha": 0.2,
      "stochdepth_rate": 0.1, "activation": "silu", "group_size": 8,
  }
  t = config.train
  t.global_batch_size = 1024
  t.num_epochs = 360.0
  t.image_size = v.train_imsize
  t.augment.random_crop = True
  t.augment.flip = True
  t.augment.mixup_alpha = MIXUP_ALPHA
  t.augment.cutmix_alpha = CUTMIX_ALPHA
  t.augment.on_device = True
  t.ema_decay = 0.99999
  t.compute_dtype = "float32"
  config.eval.image_size = v.test_imsize
  o = config.optimizer
  o.weight_decay = 5e-5 + 1e-5 * level
  o.agc.clipping = 0.0
  o.lr.base_lr = 0.4
  o.lr.base_batch_size = 1024  # lr_scale_by_bs=False.
  o.lr.end_lr_factor = 0.001 / 0.4  # min_val=0.001.
  if "smoke" in config_schema.parse_args(arg):
    _smoke(config, v, SMOKE_REGNET)
  return config


def nf_resnet_imagenet(arg: str | None = None) -> config_dict.ConfigDict:
  """NF-ResNet-50 on ImageNet with the official base `experiment.py` recipe.

  The release's base experiment (batch 1024, 90 epochs, lr 0.1 x B / 256,
  5 epochs warmup then cosine to 0, SGD + Nesterov 0.9, label smoothing 0.1,
  Inception crop + flip, float32) with the NF-ResNet-50 of `nf_resnet.py`
  (width 4, alpha 0.2, stochastic depth 0.1, ReLU). Weight decay 5e-5 and an
  EMA of 0.99999 follow the NF-RegNet recipe (the release's base experiment
  uses 1e-4 and no EMA for its BatchNorm ResNet).
  """
  config = config_schema.base_config()
  _imagenet_common(config)
  config.model.name = "NFResNet"
  config.model.kwargs = {"depth": 50, "width": 4.0, "alpha": 0.2,
                         "stochdepth_rate": 0.1, "drop_rate": 0.0,
                         "activation": "relu"}
  t = config.train
  t.global_batch_size = 1024
  t.num_epochs = 90.0
  t.image_size = 224
  t.augment.random_crop = True
  t.augment.flip = True
  t.ema_decay = 0.99999
  t.compute_dtype = "float32"
  config.eval.image_size = 224
  o = config.optimizer
  o.weight_decay = 5e-5
  o.agc.clipping = 0.0
  o.lr.base_lr = 0.1
  o.lr.base_batch_size = 256
  if "smoke" in config_schema.parse_args(arg):
    config_schema.smoke(config)
    config.model.kwargs = {**config.model.kwargs.to_dict(),
                           "depth": (1, 1, 1, 1), "width": 0.25}
  return config


def nfnet_finetune(arg: str | None = None) -> config_dict.ConfigDict:
  """Fine-tunes a pretrained NFNet-F0 on an image folder or TFDS dataset.

  The dataset is set on the command line: `--config.dataset.name=
  image_folder --config.dataset.data_dir=ROOT` for a folder of class
  folders (see `data.image_folder`; its TRAIN_AND_VALID excludes the
  evaluation images), or a TFDS name (default 'cifar10').
  Starts from an official `F0_haiku.npz` (or a converted `.npz`), replaces
  the 1000-way classifier for the dataset's classes, and trains all weights
  with the NFNet recipe at a small learning rate: batch 512, 10 epochs, lr
  0.01 x B / 256 with 1 epoch warmup then cosine, SGD + Nesterov, no weight
  decay, AGC 0.01, label smoothing 0.1, no mixing, EMA 0.9999, F0's
  resolution (192 train / 256 eval).
  """
  v = nfnet.get_variant("F0")
  config = nfnet_imagenet("F0")
  config.dataset.name = "cifar10"
  config.dataset.train_split = "train_and_valid"
  config.dataset.eval_split = "test"
  config.dataset.num_workers = 8
  config.pretrained.path = "F0_haiku.npz"
  config.pretrained.model = None  # From the file: nfnet_f0 / dm_nfnet_f0.
  config.pretrained.reinit_head = True
  # The official forward; a run from a timm file adopts timm's instead
  # (`pretrained_start.adopt_forward`).
  config.model.kwargs.update(timm.OFFICIAL_NFNET_KWARGS)
  config.model.kwargs.stochdepth_rate = 0.1
  t = config.train
  t.global_batch_size = 512
  t.num_epochs = 10.0
  t.augment.randaugment_layers = 0
  t.augment.randaugment_magnitude = 0
  # Small source images: RandAugment sizes relative to the image side.
  t.augment.randaugment_mode = "relative"
  t.augment.mixup_alpha = 0.0
  t.augment.cutmix_alpha = 0.0
  t.ema_decay = 0.9999
  config.eval.image_size = v.test_imsize
  config.eval.every_steps = 1000
  config.checkpoint.every_steps = 500
  o = config.optimizer
  o.weight_decay = 0.0
  o.lr.base_lr = 0.01
  o.lr.warmup_epochs = 1.0
  if "smoke" in config_schema.parse_args(arg):
    _smoke(config, v, SMOKE_NFNET)
    config.model.kwargs.group_size = 8
    config.pretrained.path = None  # The smoke test provides a tiny one.
  return config
