"""The config-driven, data-parallel experiment loop (train, evaluate, resume).

Modules, one job each:

* `config_schema`: every config field with its default (the schema).
* `config_validation`: checks a config before any compute.
* `parallel`: multi-host init, the local device mesh, sharded transfers.
* `losses`: cross-entropies and top-k accuracy.
* `train_state`: the typed `TrainState` and the pmapped train step.
* `evaluation`: the pmapped eval step and a full pass over the eval split.
* `checkpointing`: orbax checkpoints of the state and the data position.
* `logging`: progress bar, JSON-lines metrics, optional TensorBoard.
* `loop`: composes the above into `run(config)`.
"""
