"""Many processes, one run: torchrun setup, DDP wrapping and whole-model compile, gradient sync,
ranks agreeing or stopping together (`distributed`), and the run's model built for its ranks, FSDP2
on the meta device with per-block compile and shard-by-shard initialisation (`parallelize`)."""
