"""The MoT model: routing (sort once, grouped matmul), the MoT block and the full transformer."""

from mot.model.io import ModelInputs, ModelOutput
from mot.model.routing import Route, TowerLinear, TowerRMSNorm, route_tokens
from mot.model.transformer import MoTTransformer

__all__ = ["ModelInputs", "ModelOutput", "MoTTransformer", "Route", "TowerLinear", "TowerRMSNorm", "route_tokens"]
