"""Stream events (docs/mirror.md): the minimal shape reassembly needs; the codec lives on m-out."""

import enum
from typing import NamedTuple

TO_SERVER = 0
TO_CLIENT = 1


class Kind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3


class Event(NamedTuple):
    kind: int
    conn: int
    ts: float
    direction: int
    data: bytes
