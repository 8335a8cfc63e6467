"""mot: a trainer for Mixture-of-Transformers multimodal foundation models."""

__version__ = "0.1.0"
