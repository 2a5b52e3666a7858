"""Training infrastructure: the train loop, precision, sharding, multi-process start-up."""
