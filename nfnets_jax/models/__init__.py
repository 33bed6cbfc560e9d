"""The papers' networks as Haiku modules, and the tools that trace them.

- `layers`: scaled weight-standardized convolution, gamma-scaled
  nonlinearities, squeeze-excite, stochastic depth.
- `nfnet`, `nf_resnet`, `nf_regnet`: the normalizer-free families;
  `resnet`, `skipinit_resnet`, `fixup_resnet`: the baselines.
- `families`: family names and `make_network`, the one network builder.
- `stats`: parameter shapes and counts, FLOPs.
- `signal_propagation`: signal metrics at initialization.
"""
