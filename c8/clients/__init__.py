"""Clients of the sensor: the Python library, c8ctl and the example telemetry client."""

from c8.clients.client import Client, SensorError, SensorUnavailable, Subscription

__all__ = ["Client", "SensorError", "SensorUnavailable", "Subscription"]
