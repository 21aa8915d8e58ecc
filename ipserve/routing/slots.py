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


def shared_low_bits(a: int, b: int) -> int:
    """How many low bits two slots have in common (a == b counts as all)."""
    diff = a ^ b
    return 64 if diff == 0 else (diff & -diff).bit_length() - 1


def route_table(slots: int, ready: dict[int, int]) -> dict[int, int]:
    """Map every slot to a port, given the ports of the slots whose worker is ready.

    A slot without a ready worker is covered by the ready slot sharing the
    most low bits with it (so while the worker count doubles, clients stay on
    the worker they had with the smaller mask), ties going to the lowest slot.
    Returns {} when no worker at all is ready: then there is nothing to route to.
    """
    mask(slots)
    if not ready:
        return {}
    return {slot: ready[max(sorted(ready), key=lambda r: shared_low_bits(slot, r))]
            for slot in range(slots)}
