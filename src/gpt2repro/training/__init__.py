"""`gpt2repro train` and what only training needs: a config resolved once into a `Plan` (`plan`), the
loop (`train`, `Trainer`) and the loop on conversations (`sft`, `SFTTrainer`), the optimizers and LR
schedules (`optim`, `muon`), the training clock (`clock`), where the numbers go (`metrics`), peak
FLOP/s for MFU (`mfu`) and a run's curves (`plot`, `gpt2repro plot`)."""
