"""Broker probes: background jobs that ask the broker and the workers on a schedule."""
