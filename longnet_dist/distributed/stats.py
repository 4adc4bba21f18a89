"""Byte accounting for collectives: one process-wide `CommStats`, optionally broken down by tag."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TagStats:
    """Bytes and calls of the collectives recorded under one tag."""

    sent_bytes: int = 0
    received_bytes: int = 0
    calls: int = 0


@dataclass
class CommStats:
    """Bytes this process sent to / received from other ranks, and how many collectives it ran.

    Bytes follow the algorithm-independent definition of INTERFACES.md: for an all-gather of a
    b-byte tensor over G ranks, sent = received = (G-1)*b; a reduce-scatter whose output slice has
    b bytes moves the same amount. Collectives over a group of one rank move nothing and are not
    counted as calls.
    """

    sent_bytes: int = 0
    received_bytes: int = 0
    calls: int = 0
    by_tag: dict[str, TagStats] = field(default_factory=dict)

    def record(self, sent_bytes: int, received_bytes: int, tag: str | None = None) -> None:
        """Add one collective call; also to `by_tag[tag]` when a tag is given."""
        self.sent_bytes += sent_bytes
        self.received_bytes += received_bytes
        self.calls += 1
        if tag is not None:
            tagged = self.by_tag.setdefault(tag, TagStats())
            tagged.sent_bytes += sent_bytes
            tagged.received_bytes += received_bytes
            tagged.calls += 1

    def reset(self) -> None:
        """Zero every counter and forget all tags."""
        self.sent_bytes = 0
        self.received_bytes = 0
        self.calls = 0
        self.by_tag = {}

    def snapshot(self) -> dict:
        """A plain-dict copy: {"sent_bytes", "received_bytes", "calls", "by_tag": {tag: {...}}}."""
        return asdict(self)


_PROCESS_COMM_STATS = CommStats()


def comm_stats() -> CommStats:
    """The process-wide `CommStats` that every collective in this package adds to."""
    return _PROCESS_COMM_STATS
