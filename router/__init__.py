"""Ballast: an inference request router for heterogeneous, unreliable GPU fleets."""

__version__ = "0.1.0"
