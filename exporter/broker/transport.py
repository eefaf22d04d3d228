"""Which receiver reads a broker URL: the leanest one for its transport.

Kept apart from ``receiver``, which the lean receivers build on, so that no
module of the broker package imports one that imports it back.
"""

from __future__ import annotations

from . import amqp_reader, redis_pubsub
from .receiver import KombuReceiver, Receiver


def receiver_class(broker_url: str) -> type[Receiver]:
    """The leanest receiver for the broker URL's transport."""
    if redis_pubsub.handles(broker_url):
        return redis_pubsub.RedisReceiver
    if amqp_reader.handles(broker_url):
        return amqp_reader.AMQPReceiver
    return KombuReceiver
