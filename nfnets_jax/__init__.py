"""nfnets_jax: Normalizer-Free Networks and Adaptive Gradient Clipping in JAX.

Importing it changes nothing in the process: no environment variable, no
`jax.config` value, no allocator setting. The CPU settings that make NFNets
fast go to the programs the package compiles (`nfnets_jax.cpu`).

References:
  Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
    Without Normalization. ICML 2021.
  Brock, De, Smith. Characterizing signal propagation to close the
    performance gap in unnormalized ResNets. ICLR 2021.
"""
from nfnets_jax import cpu
from nfnets_jax.cpu.lowering import conv_impl
from nfnets_jax.models.families import MODELS
from nfnets_jax.models.families import build_model
from nfnets_jax.models.families import make_network
from nfnets_jax.models.fixup_resnet import FixupResNet
from nfnets_jax.models.layers import NONLINEARITY_GAMMAS
from nfnets_jax.models.layers import SqueezeExcite
from nfnets_jax.models.layers import StochDepth
from nfnets_jax.models.layers import WSConv2D
from nfnets_jax.models.layers import estimate_gamma
from nfnets_jax.models.layers import get_activation
from nfnets_jax.models.nf_regnet import NF_REGNET_VARIANTS
from nfnets_jax.models.nf_regnet import NFRegNet
from nfnets_jax.models.nf_resnet import NFResNet
from nfnets_jax.models.nfnet import NFNET_VARIANTS
from nfnets_jax.models.nfnet import NFNet
from nfnets_jax.models.normfree import NORMFREE_CONFIGS
from nfnets_jax.models.normfree import NormFreeConfig
from nfnets_jax.models.normfree import NormFreeNet
from nfnets_jax.models.resnet import RESNET_DEPTHS
from nfnets_jax.models.resnet import ResNet
from nfnets_jax.models.skipinit_resnet import SkipInitResNet
from nfnets_jax.models.stats import count_flops
from nfnets_jax.models.stats import count_params
from nfnets_jax.optim.agc import AdaptiveGradClipState
from nfnets_jax.optim.agc import adaptive_grad_clip
from nfnets_jax.optim.agc import clip_stats
from nfnets_jax.optim.optimizers import OPTIMIZERS
from nfnets_jax.optim.optimizers import agc_mask
from nfnets_jax.optim.optimizers import make_optimizer
from nfnets_jax.optim.optimizers import make_schedule
from nfnets_jax.optim.optimizers import weight_decay_mask
from nfnets_jax.optim.optimizers import with_sam
from nfnets_jax.pretrained.checks import ParamsMismatchError
from nfnets_jax.pretrained.checks import check_params
from nfnets_jax.pretrained.checks import infer_variant
from nfnets_jax.pretrained.checks import replace_classifier
from nfnets_jax.pretrained.create import Model
from nfnets_jax.pretrained.create import create_model
from nfnets_jax.pretrained.export import export
from nfnets_jax.pretrained.export import load_exported
from nfnets_jax.pretrained.official import UnsafeCheckpointError
from nfnets_jax.pretrained.official import load_pretrained
from nfnets_jax.pretrained.official import save_npz
from nfnets_jax.pretrained.registry import DataConfig
from nfnets_jax.pretrained.registry import list_models
from nfnets_jax.pretrained.timm import OFFICIAL_NFNET_KWARGS
from nfnets_jax.pretrained.timm import TIMM_NFNET_KWARGS
from nfnets_jax.pretrained.timm import from_timm_state_dict

__all__ = (
    "adaptive_grad_clip",
    "AdaptiveGradClipState",
    "agc_mask",
    "build_model",
    "check_params",
    "clip_stats",
    "conv_impl",
    "count_flops",
    "count_params",
    "cpu",
    "create_model",
    "DataConfig",
    "estimate_gamma",
    "export",
    "FixupResNet",
    "from_timm_state_dict",
    "get_activation",
    "infer_variant",
    "list_models",
    "load_exported",
    "load_pretrained",
    "make_network",
    "make_optimizer",
    "make_schedule",
    "Model",
    "MODELS",
    "NF_REGNET_VARIANTS",
    "NFNet",
    "NFNET_VARIANTS",
    "NFRegNet",
    "NFResNet",
    "NONLINEARITY_GAMMAS",
    "NORMFREE_CONFIGS",
    "NormFreeConfig",
    "NormFreeNet",
    "OFFICIAL_NFNET_KWARGS",
    "OPTIMIZERS",
    "ParamsMismatchError",
    "replace_classifier",
    "ResNet",
    "RESNET_DEPTHS",
    "save_npz",
    "SkipInitResNet",
    "SqueezeExcite",
    "StochDepth",
    "TIMM_NFNET_KWARGS",
    "UnsafeCheckpointError",
    "weight_decay_mask",
    "with_sam",
    "WSConv2D",
)
