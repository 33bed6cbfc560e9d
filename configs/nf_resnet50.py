r"""NF-ResNet-50 on ImageNet with the release's base recipe (experiment.py).

    nfnets-train --config configs/nf_resnet50.py --workdir DIR \
        --config.dataset.data_dir=/path/to/tfds   # imagenet2012, array_record
    nfnets-train --config configs/nf_resnet50.py:smoke --workdir DIR  # 1 tiny step

Recipe: `nfnets_jax.experiment.recipes.nf_resnet_imagenet` (global batch
1024, 90 epochs, SGD + Nesterov, lr 0.1 x 1024 / 256, 5 epochs warmup +
cosine to 0, weight decay 5e-5, label smoothing 0.1, EMA 0.99999, Inception
crop + flip, float32; NF-ResNet-50 width 4, alpha 0.2, stochastic depth 0.1,
ReLU, 224px). The release ships no NF-ResNet experiment file: the optimizer
and schedule are its base experiment's, weight decay and EMA its NF-RegNet
recipe's.
Expected result: see the ICLR 2021 paper (Brock, De & Smith); not reproduced
here.
Runtime: not measured here (no accelerator pod). The smoke form (one step of
a tiny model) needs the dataset prepared; the tests run it on TFDS mock
data when asked (`pytest -m long`; 12-16 s on 2 CPU cores).
"""
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """NF-ResNet-50; `arg='smoke'` gives the one-step tiny form."""
  return recipes.nf_resnet_imagenet(arg)
