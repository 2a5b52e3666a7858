"""Training infrastructure: the train loop, optimisers, sharded application of a model,
checkpoints, precision, sharding, multi-process start-up."""
