"""Helpers for tests of signal propagation at initialization.

The helpers live in `nfnets_jax.signal_propagation` (the experiment scripts
use them too); this module keeps the names the tests import.
"""
from nfnets_jax.models.signal_propagation import block_arrays
from nfnets_jax.models.signal_propagation import predicted_variances
from nfnets_jax.models.signal_propagation import set_skip_gains
from nfnets_jax.models.signal_propagation import transition_blocks

__all__ = ["block_arrays", "predicted_variances", "set_skip_gains",
           "transition_blocks"]
