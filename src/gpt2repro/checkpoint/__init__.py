"""Checkpoints on disk and a run's use of them: what every checkpoint directory shares, its manifest,
verification, `latest`, pruning and setting aside (`ckptdir`); the gathered format of one process or
DDP, and loading a model or a run's state from either format (`gathered`); FSDP's sharded DCP format
(`sharded`); the run directory owned for one run: its lock, a fresh start, saving, setting aside
(`checkpointer`); and the checkpoint a resume starts from, agreed by every rank, FSDP's ranks
splitting the hashing (`resume`)."""
