"""Checkpoints on disk and a run's use of them: what every checkpoint directory shares, its manifest,
verification, `latest`, pruning and setting aside (`ckptdir`); the gathered format of one process or
DDP, and loading a model or a run's state from either format (`gathered`); FSDP's sharded DCP format
(`sharded`); and the run directory owned for one run: its lock, which checkpoint a resume starts
from, saving (`checkpointer`)."""
