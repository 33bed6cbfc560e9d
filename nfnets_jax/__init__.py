"""nfnets_jax: Normalizer-Free Networks and Adaptive Gradient Clipping in JAX."""
from nfnets_jax.layers import NONLINEARITY_GAMMAS
from nfnets_jax.layers import SqueezeExcite
from nfnets_jax.layers import StochDepth
from nfnets_jax.layers import WSConv2D
from nfnets_jax.layers import estimate_gamma
from nfnets_jax.layers import get_activation
from nfnets_jax.model_stats import count_flops
from nfnets_jax.model_stats import count_params
from nfnets_jax.nfnet import NFNET_VARIANTS
from nfnets_jax.nfnet import NFNet
