"""Metrics and spans: the metric table, its exposition, and traces over OTLP."""
