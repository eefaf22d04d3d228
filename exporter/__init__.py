"""Prometheus metrics and trace spans from Celery's event stream."""

__version__ = "0.1.0"
