"""Streaming DDP trainer for image diffusion on frame-window shards (`torchrun -m train`)."""
