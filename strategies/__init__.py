"""Server strategies with their client algorithms (the local update rules)."""

from .base import ClientAlgorithm, ClientData, ServerSettings, StrategySpec, TrainResult, TrainSettings
from .registry import get_strategy, register_strategy, strategy_names

__all__ = ["ClientAlgorithm", "ClientData", "ServerSettings", "StrategySpec", "TrainResult",
           "TrainSettings", "get_strategy", "register_strategy", "strategy_names"]
