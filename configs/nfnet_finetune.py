r"""Fine-tunes a pretrained NFNet-F0 on your image folder or a TFDS dataset.

Fine-tune F0 on my folder of images (ROOT/<class>/<images>, or ROOT/train/
and ROOT/val/ each holding the class folders):

    nfnets-train --config configs/nfnet_finetune.py --workdir DIR \
        --config.dataset.name=image_folder --config.dataset.data_dir=ROOT

On a prepared TFDS dataset instead: `--config.dataset.name=cifar10
--config.dataset.data_dir=/path/to/tfds`.

`--config.pretrained.path` (default `F0_haiku.npz` in the current folder)
takes the official `F0_haiku.npz`, a converted `.npz`, timm's
`dm_nfnet_f0` `.safetensors` / `.pth` (fine-tuned with timm's forward, so
its logits are timm's; `--config.pretrained.model=nfnet_f0` for the official
one), another timm NF model's file (`eca_nfnet_l0`, `nf_resnet50`, ...: the
run's model becomes that `NormFreeNet`, logged at the start) or an
nfnets-train workdir. The
1000-way classifier is replaced by one for the dataset's classes
(`pretrained.reinit_head=True`) and everything is trained: batch 512, 10
epochs, lr 0.01 x 512 / 256 with 1 epoch warmup + cosine, SGD + Nesterov, no
weight decay, AGC 0.01, label smoothing 0.1, no mixing, EMA 0.9999,
bfloat16, F0's 192px train / 256px test resolution (small images are
resized up). RandAugment is off; when turned on
(`--config.train.augment.randaugment_layers=2
--config.train.augment.randaugment_magnitude=5`) it runs in the
image-size-relative mode (`train.augment.randaugment_mode='relative'`).

Image folder (`nfnets_jax.data.image_folder`): class names are the sorted
folder names (saved as DIR/class_names.json, which `nfnets-predict
--pretrained DIR` shows); JPEG, PNG, BMP and WebP files, grey or RGBA
converted to RGB. Without split folders, one image in ten of each class
(evenly spaced in file-name order; at least one of a class of >= 2 images)
is held out as the evaluation set; `train_and_valid` is then the rest, so
the default splits never train on it. Missing folder, no class folders, an
empty class, fewer images than the batch or split folders with different
classes stop the run before compute (exit 2); an image that cannot be
decoded stops it, naming the file, after saving a checkpoint (exit 2).
Set `--config.train.global_batch_size` below the number of images.
Expected result: not measured here (the pretrained weights cannot be
downloaded on this machine).
Runtime: not measured here (no accelerator). The smoke form (one step, with a
tiny model the test saves as the "pretrained" file) needs the dataset
prepared; the tests fine-tune it on an image folder
(tests/data/test_image_folder.py).
"""
from nfnets_jax.experiment import recipes


def get_config(arg: str | None = None):
  """Fine-tuning; `arg='smoke'` gives the one-step tiny form."""
  return recipes.nfnet_finetune(arg)
