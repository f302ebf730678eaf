import enum
from typing import NamedTuple


class Kind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    CLOSE = 3


class Event(NamedTuple):
    kind: Kind
    conn: int
    ts: float
    direction: int
    data: bytes


TO_SERVER = 0
TO_CLIENT = 1
