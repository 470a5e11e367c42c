"""fedsim: a federated-learning simulator with a gradient-privacy attack and defense suite."""

__version__ = "0.1.0"
