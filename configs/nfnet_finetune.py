r"""Fine-tunes a pretrained NFNet-F0 on another TFDS dataset with a new head.

    nfnets-train --config configs/nfnet_finetune.py --workdir DIR \
        --config.pretrained.path=F0_haiku.npz \
        --config.dataset.name=cifar10 --config.dataset.data_dir=/path/to/tfds

Starts from the official `F0_haiku.npz` (or a `.npz` from
`python -m nfnets_jax.pretrained convert`), replaces the 1000-way classifier
with one for the dataset's classes (`pretrained.reinit_head=True`) and trains
everything: batch 512, 10 epochs, lr 0.01 x 512 / 256 with 1 epoch warmup +
cosine, SGD + Nesterov, no weight decay, AGC 0.01, label smoothing 0.1, no
mixing, EMA 0.9999, bfloat16, F0's 192px train / 256px test resolution. Any
prepared TFDS image-classification dataset works (`--config.dataset.name`).
Expected result: not measured here (the pretrained weights cannot be
downloaded on this machine).
Runtime: not measured here (no accelerator). The smoke form (a tiny model
saved as the "pretrained" file by the test) runs one step on CPU in ~30 s.
"""
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """Fine-tuning; `arg='smoke'` gives the one-step tiny form."""
  return recipes.nfnet_finetune(arg)
