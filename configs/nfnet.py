r"""NFNet-F0 ... F7 on ImageNet, the official recipe (experiment_nfnets.py).

    nfnets-train --config configs/nfnet.py:F3 --workdir DIR \
        --config.dataset.data_dir=/path/to/tfds   # imagenet2012, array_record
    nfnets-train --config configs/nfnet.py:F3,smoke --workdir DIR  # 1 tiny step

The argument names the variant (F0 ... F7, default F0); `smoke` adds the
one-step tiny form. `configs/nfnet_f3.py` (the name of the file per variant
this replaces) still works: `nfnets-train` reads it as `configs/nfnet.py:f3`.

Recipe: `nfnets_jax.experiment.recipes.nfnet_imagenet`: global batch 4096,
360 epochs, SGD + Nesterov, lr 0.1 x 4096 / 256, 5 epochs warmup + cosine,
AGC 0.01, weight decay 2e-5, label smoothing 0.1, EMA 0.99999, stochastic
depth 0.25, CutMix + MixUp + RandAugment (4 layers), bfloat16, and per
variant (`nfnets_jax.NFNET_VARIANTS`):

| variant | train / test px | RandAugment magnitude | dropout | paper top-1 (EMA, test px) |
|---|---|---|---|---|
| F0 | 192 / 256 | 5 | 0.2 | 83.6% |
| F1 | 224 / 320 | 10 | 0.3 | 84.7% |
| F2 | 256 / 352 | 10 | 0.4 | 85.1% |
| F3 | 320 / 416 | 15 | 0.4 | 85.7% |
| F4 | 384 / 512 | 15 | 0.5 | 85.9% |
| F5 | 416 / 544 | 15 | 0.5 | 86.0% |
| F6 | 448 / 576 | 15 | 0.5 | 86.5%, with SAM (below) |
| F7 | 480 / 608 | 15 | 0.5 | none published |

F6 adds Sharpness-Aware Minimization, as the paper trained it (its 86.5%,
Fig. 1 and Table 2): `optimizer.sam.rho=0.05` with per-device
perturbations (`sync_perturbations=False`). The NFNet paper's text found
here gives no SAM settings, so these are the SAM paper's ImageNet value
(Foret et al., ICLR 2021: rho 0.05) and the SAM authors' JAX default
(google-research/sam, `sync_perturbations=False`: each device perturbs
with its own shard's gradient, their "m-sharpness"). SAM computes two
gradients per step (about twice a step's cost). `--config.optimizer.sam.rho=0`
trains F6 without it; `--config.optimizer.sam.rho=0.05` adds it to any
variant.

Expected result: the last column (ImageNet top-1, Brock et al. 2021,
Table 2).
Runtime: not measured here (no TPU/GPU pod); the paper trained on TPUv3
pods. The smoke form (one step of a tiny model) needs the dataset prepared;
the tests run this smoke form on TFDS mock data (12-16 s on 2 CPU
cores; the other ImageNet configs' smoke runs are opt-in, `-m long`).
"""
from nfnets_jax import NFNET_VARIANTS
from nfnets_jax.experiment import config_schema
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """NFNet of `arg`'s variant ('F0' ... 'F7', default F0); 'smoke' shrinks it.

  Raises:
    ValueError: an argument that is neither a variant nor 'smoke'.
  """
  variant, smoke = config_schema.variant_arg(arg, NFNET_VARIANTS, "F0",
                                             "configs/nfnet.py")
  return recipes.nfnet_imagenet(variant, "smoke" if smoke else None)
