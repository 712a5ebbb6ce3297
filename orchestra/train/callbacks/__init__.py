"""Behaviour added to training as Lightning callbacks rather than branches in the step."""

from orchestra.train.callbacks.energy import EnergyCallback
from orchestra.train.callbacks.throughput import ThroughputCallback

__all__ = ["EnergyCallback", "ThroughputCallback"]
