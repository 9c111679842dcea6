"""LiveKit-style identifiers: a prefix and 12 base57 characters (`AW_`, `AJ_`, `AD_`, `RM_`)."""

from __future__ import annotations

import secrets
from typing import Final

BASE57: Final = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
ID_LENGTH: Final = 12
WORKER_PREFIX: Final = "AW_"
JOB_PREFIX: Final = "AJ_"
DISPATCH_PREFIX: Final = "AD_"
ROOM_PREFIX: Final = "RM_"


def new_id(prefix: str) -> str:
    """`prefix` followed by 12 random base57 characters."""
    return prefix + "".join(secrets.choice(BASE57) for _ in range(ID_LENGTH))
