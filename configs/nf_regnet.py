r"""NF-RegNet-B0 ... B8 on ImageNet, the official recipe (experiment_nf_regnets.py).

    nfnets-train --config configs/nf_regnet.py:B0 --workdir DIR \
        --config.dataset.data_dir=/path/to/tfds   # imagenet2012, array_record
    nfnets-train --config configs/nf_regnet.py:B0,smoke --workdir DIR  # 1 tiny step

The argument names the variant (B0 ... B8, default B0); `smoke` adds the
one-step tiny form (`configs/nf_regnet_b0.py` still works, read as
`configs/nf_regnet.py:b0`).

Recipe: `nfnets_jax.experiment.recipes.nf_regnet_imagenet` (global batch 1024,
360 epochs, SGD + Nesterov, lr 0.4 unscaled, 5 epochs warmup + cosine to
0.001, weight decay 5e-5 + 1e-5 per level (B0: 5e-5), no AGC, label
smoothing 0.1, EMA 0.99999, MixUp + CutMix, float32, width 0.75, expansion
2.25, stochastic depth 0.1, SiLU, the variant's train / test resolution and
dropout (`nfnets_jax.NF_REGNET_VARIANTS`; B0: 192 / 224 px)). Deviation: the
release evaluates NF-RegNets with 'crop_resize' (center crop, then resize);
the pipeline here resizes to test + 32 then center-crops, as for NFNets.
Expected result: see the ICLR 2021 paper (Brock, De & Smith), whose NF-RegNet
table this recipe comes from; not reproduced here.
Runtime: not measured here (no accelerator pod). The smoke form (one step of
a tiny model) needs the dataset prepared; the tests run it on TFDS mock
data when asked (`pytest -m long`; 12-16 s on 2 CPU cores).
"""
from nfnets_jax import NF_REGNET_VARIANTS
from nfnets_jax.experiment import config_schema
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """NF-RegNet of `arg`'s variant ('B0' ... 'B8', default B0); 'smoke'
  shrinks it.

  Raises:
    ValueError: an argument that is neither a variant nor 'smoke'.
  """
  variant, smoke = config_schema.variant_arg(arg, NF_REGNET_VARIANTS, "B0",
                                             "configs/nf_regnet.py")
  return recipes.nf_regnet_imagenet(variant, "smoke" if smoke else None)
