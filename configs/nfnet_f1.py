r"""NFNet-F1 on ImageNet, the official recipe (experiment_nfnets.py).

    nfnets-train --config configs/nfnet_f1.py --workdir DIR \
        --config.dataset.data_dir=/path/to/tfds   # imagenet2012, array_record
    nfnets-train --config configs/nfnet_f1.py:smoke --workdir DIR  # 1 tiny step

Recipe: `nfnets_jax.experiment.recipes.nfnet_imagenet` (global batch 4096,
360 epochs, SGD + Nesterov, lr 0.1 x 4096 / 256, 5 epochs warmup + cosine,
AGC 0.01, weight decay 2e-5, label smoothing 0.1, EMA 0.99999, stochastic
depth 0.25, dropout 0.3, CutMix + MixUp + RandAugment
4 layers magnitude 10, bfloat16, train 224px / test 320px).
Expected result: ImageNet top-1 84.7% with the EMA weights at 320px (paper, Table 2).
Runtime: not measured here (no TPU/GPU pod); the paper trained on TPUv3
pods. The smoke form runs one step of a tiny model on CPU in ~30 s.
"""
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """NFNet-F1; `arg='smoke'` gives the one-step tiny form."""
  return recipes.nfnet_imagenet("F1", arg)
