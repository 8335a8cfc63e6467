"""The MoT model: routing (sort once, grouped matmul), the MoT block and the full transformer."""

from mot.model.routing import Route, TowerLinear, TowerRMSNorm, route_tokens
from mot.model.transformer import MoTTransformer

__all__ = ["MoTTransformer", "Route", "TowerLinear", "TowerRMSNorm", "route_tokens"]
