"""What the end-to-end suites share about backends and routing expectations.

Expectations are computed here independently of ipserve's own slot code.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import subprocess
import sys

from netns import active_workers


def which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@functools.cache
def _iptc_importable() -> str | None:
    """None if python-iptables imports in this interpreter (the one ipserve runs
    with), else why not. Imported in a child: it loads C libraries."""
    proc = subprocess.run([sys.executable, "-c", "import iptc"], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def backend_unavailable(kind: str) -> str | None:
    """Why the routing backend `kind` cannot be tested here, or None."""
    if kind == "nft" and not which("nft"):
        return "nft is not installed (apt-get install nftables)"
    if kind == "iptables" and not (which("iptables-restore") and which("ip6tables-restore")):
        return "iptables-restore is not installed (apt-get install iptables)"
    if kind == "iptc":
        why = _iptc_importable()
        if why:
            return f"python-iptables is not importable in {sys.executable}: {why}"
        if not which("iptables-legacy"):
            return "iptables-legacy is not installed (needed to see iptc's rules)"
    return None


def slot_of(address: str, workers: int) -> int:
    """What the kernel must pick: the low bits of the client's own address."""
    return int(ipaddress.ip_address(address)) & (workers - 1)


def routed_workers(st: dict, workers: int, generation: int | None = None) -> dict[int, dict] | None:
    """slot -> worker, if every slot has exactly one active worker (of
    `generation`, if given) and the master's installed routes send each slot
    to that worker's port; else None."""
    by_slot: dict[int, list[dict]] = {}
    for w in active_workers(st):
        by_slot.setdefault(w["slot"], []).append(w)
    if sorted(by_slot) != list(range(workers)) or any(len(ws) != 1 for ws in by_slot.values()):
        return None
    table = {slot: ws[0] for slot, ws in by_slot.items()}
    if generation is not None and any(w["generation"] != generation for w in table.values()):
        return None
    if st.get("routes") != {str(slot): w["port"] for slot, w in table.items()}:
        return None
    return table
