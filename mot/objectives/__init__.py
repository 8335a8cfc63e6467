"""Training objectives per modality.

- `ar` (ar.py): next-token cross-entropy, reported per modality of the predicted token.
- `diffusion` (diffusion.py, latents.py): the Transfusion setting. An image span holds the VQGAN's latent grid
  as continuous tokens (latents.py: codebook vectors, normalised, patchified; the batch rewrite), noised at a
  per-image time; the loss regresses the noise (cosine DDPM) or the velocity (rectified flow); diffusion.py
  also has the samplers used by mot.generate.
"""
