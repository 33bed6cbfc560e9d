"""Named models and their weights: registry, checkpoint formats, export.

- `registry`: model names -> family, kwargs and data config.
- `official`: DeepMind's pickled files (a restricted unpickler) and the safe
  `.npz` format.
- `timm`: timm's `dm_nfnet_*` state dicts.
- `checks`: params against a model (names, shapes, variant, classifier).
- `create`: reading any checkpoint, `create_model` and its `Model`.
- `export`: a model's forward and weights as one `jax.export` file.
"""
