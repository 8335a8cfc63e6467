"""Training objectives per modality: `ar` (next-token cross-entropy); `diffusion` comes with its issue."""
