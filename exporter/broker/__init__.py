"""Broker stage: receiving raw event messages, reconnecting forever."""
