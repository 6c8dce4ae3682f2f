"""Random identifiers, drawn without a system call each.

`uuid.uuid4` reads the kernel's random source on every call, which shows
in a profile of the hot paths. These come from a generator seeded once
from that source (and again in a forked child, which would otherwise
share its parent's state). They are unique, not secret: nothing in Baton
treats an id as a credential.
"""

from __future__ import annotations

import os
import random
import uuid

_random = random.Random(os.urandom(32))


def _reseed() -> None:
    _random.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def random_uuid() -> str:
    """A version-4 UUID in its canonical text form."""
    return str(uuid.UUID(int=_random.getrandbits(128), version=4))


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as lowercase hex."""
    return format(_random.getrandbits(nbytes * 8), f"0{nbytes * 2}x")
