r"""NF-RegNet-B0 on ImageNet, the official recipe (experiment_nf_regnets.py).

    nfnets-train --config configs/nf_regnet_b0.py --workdir DIR \
        --config.dataset.data_dir=/path/to/tfds   # imagenet2012, array_record
    nfnets-train --config configs/nf_regnet_b0.py:smoke --workdir DIR  # 1 tiny step

Recipe: `nfnets_jax.experiment.recipes.nf_regnet_imagenet` (global batch 1024,
360 epochs, SGD + Nesterov, lr 0.4 unscaled, 5 epochs warmup + cosine to
0.001, weight decay 5e-5, no AGC, label smoothing 0.1, EMA 0.99999, MixUp +
CutMix, float32, width 0.75, expansion 2.25, stochastic depth 0.1, SiLU,
train 192px / test 224px). Deviation: the release evaluates NF-RegNets with
'crop_resize' (center crop, then resize); the pipeline here resizes to
test + 32 then center-crops, as for NFNets.
Expected result: see the ICLR 2021 paper (Brock, De & Smith), whose NF-RegNet
table this recipe comes from; not reproduced here.
Runtime: not measured here (no accelerator pod). The smoke form runs one
step of a tiny model on CPU in ~30 s.
"""
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """NF-RegNet-B0; `arg='smoke'` gives the one-step tiny form."""
  return recipes.nf_regnet_imagenet("B0", arg)
