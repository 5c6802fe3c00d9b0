"""Lowerings of a Plan: hooks (the exact reference); artifacts come in later modules."""

from steer.lower.hooks import SteeringRun, applied

__all__ = ["SteeringRun", "applied"]
