"""Training: config, the training loop (single process or torchrun + FSDP2), checkpoints, recipes."""
