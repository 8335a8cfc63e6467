"""Weights and vocabularies from outside the project: Hugging Face Chameleon checkpoints."""
