"""Slot arithmetic: which worker slot a client address belongs to.

Pure functions only; the backends turn their results into kernel rules.
A client's slot is the low bits of its source address: saddr & (slots - 1).
"""

from __future__ import annotations

import ipaddress


def mask(slots: int) -> int:
    if slots < 1 or slots & (slots - 1):
        raise ValueError(f"slot count must be a power of two, not {slots}")
    return slots - 1


def slot_of(address: str, slots: int) -> int:
    """The slot the kernel will pick for a client at `address`."""
    return int(ipaddress.ip_address(address)) & mask(slots)
