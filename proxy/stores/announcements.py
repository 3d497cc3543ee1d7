"""What one process tells the others over Redis pub/sub: key changes (keys.py) and cache purges (generations.py).

One subscription per process carries every channel: one connection to the state store (on a cluster, to one node
at a time, stores/topology.py NodeSubscriber; a PUBLISH reaches every node). Each message goes to its channel's
handler as it arrives. Each (re)subscription calls every channel's `subscribed` and each loss its `lost`: whatever
was published while no one listened is unheard, so each kind of state says how it catches up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("proxy.announcements")


@dataclass(frozen=True)
class Channel:
    name: str
    message: Callable[[bytes], None]
    subscribed: Callable[[], None]
    lost: Callable[[], None]


async def listen(client: Any, channels: Sequence[Channel], retry_s: float = 1.0) -> None:
    """Hand published messages to their channels until cancelled; subscribe again `retry_s` after any failure."""
    by_name = {c.name.encode(): c for c in channels}
    while True:
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(*(c.name for c in channels))
                for c in channels:
                    c.subscribed()
                async for message in pubsub.listen():
                    channel, data = by_name.get(message.get("channel")), message.get("data")
                    if channel is not None and isinstance(data, bytes):
                        _hand(channel, data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection dropped: catch up, try again
            log.warning("subscription to key changes and cache purges lost (%s); retrying", type(exc).__name__)
            for c in channels:
                c.lost()
        await asyncio.sleep(retry_s)


def _hand(channel: Channel, data: bytes) -> None:
    """One message to its handler: a message its handler cannot take (anyone may PUBLISH) is logged and dropped,
    never the subscription that carries every other channel's."""
    try:
        channel.message(data)
    except Exception:
        log.exception("message on %s ignored: its handler failed on %r", channel.name, data[:200])
