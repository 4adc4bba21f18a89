"""Floor 4: the trainer. `python -m longnet_dist.train` (Hydra on configs/train.yaml); in Python,
`longnet_dist.train.trainer.train(cfg)`. Modules: config (schema, checks, DeepSpeed dict), engine,
loss (sequence-parallel loss scaling), trainer (the loop), evaluate, metrics, state, checkpoint, faults."""
