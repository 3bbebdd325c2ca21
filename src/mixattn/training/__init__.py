"""Training with Composer, one module per part; the plain model
(:mod:`mixattn.model`) knows none of it.

- :mod:`~mixattn.training.recipe`: the recipe schema, loaded from YAML and
  overrides, every check that needs only the recipe (no Composer import);
- :mod:`~mixattn.training.composer_model`: the ComposerModel around the model;
- :mod:`~mixattn.training.loaders`: StreamingDataset loaders over MDS shards;
- :mod:`~mixattn.training.optim`: optimizer and schedule registries;
- :mod:`~mixattn.training.parallelize`: checkpointing, compile, FSDP/DDP,
  applied in one ordered function;
- :mod:`~mixattn.training.callbacks`: what a run adds to the Trainer;
- :mod:`~mixattn.training.save`: the save folder, checked before training;
- :mod:`~mixattn.training.trainer`: ``build_trainer``, which only puts the
  parts together.
"""
