"""Server strategies with their client algorithms (the local update rules), the one local
trainer they share, and the upload codecs (``strategies.compression``)."""

from .base import ClientAlgorithm, ClientJob, ServerSettings, StrategySpec, client_config
from .registry import get_strategy, register_strategy, strategy_names
from .trainer import ClientData, LocalTrainer, TrainSettings
from .upload import Upload

__all__ = ["ClientAlgorithm", "ClientData", "ClientJob", "LocalTrainer", "ServerSettings", "StrategySpec",
           "TrainSettings", "Upload", "client_config", "get_strategy", "register_strategy", "strategy_names"]
