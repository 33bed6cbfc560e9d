"""nfnets_jax: Normalizer-Free Networks and Adaptive Gradient Clipping in JAX.

References:
  Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
    Without Normalization. ICML 2021.
  Brock, De, Smith. Characterizing signal propagation to close the performance
    gap in unnormalized ResNets. ICLR 2021.
"""
from nfnets_jax import cpu_flags
from nfnets_jax import host_malloc

cpu_flags.apply()  # Before any JAX computation starts a backend.
host_malloc.tune()  # If NFNETS_JAX_MALLOC=1; before any backend starts.

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets_jax.agc import AdaptiveGradClipState
from nfnets_jax.agc import adaptive_grad_clip
from nfnets_jax.agc import clip_stats
from nfnets_jax.builder import Model
from nfnets_jax.builder import create_model
from nfnets_jax.exporting import export
from nfnets_jax.exporting import load_exported
from nfnets_jax.fixup_resnet import FixupResNet
from nfnets_jax.layers import NONLINEARITY_GAMMAS
from nfnets_jax.layers import SqueezeExcite
from nfnets_jax.layers import StochDepth
from nfnets_jax.layers import WSConv2D
from nfnets_jax.layers import estimate_gamma
from nfnets_jax.layers import get_activation
from nfnets_jax.model_stats import count_flops
from nfnets_jax.model_stats import count_params
from nfnets_jax.models import MODELS
from nfnets_jax.models import build_model
from nfnets_jax.nf_regnet import NF_REGNET_VARIANTS
from nfnets_jax.nf_regnet import NFRegNet
from nfnets_jax.nf_resnet import NFResNet
from nfnets_jax.nfnet import NFNET_VARIANTS
from nfnets_jax.nfnet import NFNet
from nfnets_jax.optim import OPTIMIZERS
from nfnets_jax.optim import agc_mask
from nfnets_jax.optim import make_optimizer
from nfnets_jax.optim import make_schedule
from nfnets_jax.optim import weight_decay_mask
from nfnets_jax.param_checks import ParamsMismatchError
from nfnets_jax.pretrained import OFFICIAL_NFNET_KWARGS
from nfnets_jax.pretrained import TIMM_NFNET_KWARGS
from nfnets_jax.pretrained import check_params
from nfnets_jax.pretrained import from_timm_state_dict
from nfnets_jax.pretrained import infer_variant
from nfnets_jax.pretrained import load_pretrained
from nfnets_jax.pretrained import replace_head
from nfnets_jax.registry import DataConfig
from nfnets_jax.registry import list_models
from nfnets_jax.resnet import RESNET_DEPTHS
from nfnets_jax.resnet import ResNet
from nfnets_jax.skipinit_resnet import SkipInitResNet
