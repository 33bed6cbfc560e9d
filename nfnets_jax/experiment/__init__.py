"""The config-driven, data-parallel experiment loop (train, evaluate, resume).

Modules, one job each, from the bottom up:

* `config_schema`: every config field with its default; `ConfigError`.
* `parallel`: multi-host init, the local device mesh, sharded transfers.
* `checkpoint_io`: orbax checkpoints of the state and the data position:
  read, verify, set aside (below `pretrained` and the loop).
* `losses`: cross-entropies and top-k accuracy.
* `pretrained_start`: a fine-tuning run's checkpoint: its forward, read once.
* `config_validation`: checks a config before any compute (decides, never
  changes it): the run's sizes and optimizer.
* `train_state`: the typed `TrainState`, its template, the pmapped train step.
* `evaluation`: the pmapped eval step and a full pass over the eval split.
* `inputs`: the training stream and eval passes of a run.
* `run_identity`: what a resume may not change (config.json, written
  once; allowed changes recorded beside it).
* `logging`: progress bar, JSON-lines metrics, optional TensorBoard.
* `recipes`: the papers' training recipes as configs.
* `loop`: composes the above into `run(config)`.
"""
