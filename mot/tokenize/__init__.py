"""Tokenizers (library code): text BPE, VQGAN image codes, speech units. Configs live in tokenizers/."""
