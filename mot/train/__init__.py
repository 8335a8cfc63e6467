"""The trainer (accelerate), checkpoints, logging and evaluation."""
