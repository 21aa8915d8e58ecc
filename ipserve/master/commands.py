"""Admin commands on the control socket: who may send them, and what they do.

Only root and the master's own uid may command a master, whatever the socket
file's owner or mode: the kernel says who connected (SO_PEERCRED), read once
at accept. Workers run as another user precisely so that application code
cannot reach these. Every request is answered with one line, then the
connection closes.
"""

from __future__ import annotations

import os
import signal

from ipserve import messages
from ipserve.master import adoption
from ipserve.messages import BadMessage, Command


def authorized(uid: int) -> bool:
    return uid in (0, os.geteuid())


def handle(master, conn, raw: dict) -> None:
    conn.closing = True
    if not authorized(conn.peer.uid):
        master.log.warning("control: refused a command from pid %d (uid %d): only root and uid %d "
                           "may control this master", conn.peer.pid, conn.peer.uid, os.geteuid())
        reply(master, conn, {"ok": False, "error": f"permission denied: uid {conn.peer.uid} may not "
                                                   f"control this master (only root and uid "
                                                   f"{os.geteuid()})"})
        return
    try:
        request = messages.parse_request(raw)
    except BadMessage as exc:
        reply(master, conn, {"ok": False, "error": f"bad request: {exc}"})
        return
    if request.command is Command.HANDOVER:
        answer, fds = adoption.handover(master, request.pid)
        if not conn.send_fds_now(answer, fds):
            master.handed_over = False   # the new master is gone: keep serving
        master.control.close(conn)
        return
    reply(master, conn, ACTIONS[request.command](master))


def reply(master, conn, answer: dict) -> None:
    conn.send(answer)
    master.control.after_send(conn)


def queue_signal(signum: int, text: str):
    def action(master) -> dict:
        master.pending_signals.append(signum)
        return {"ok": True, "message": text}
    return action


ACTIONS = {
    Command.STATUS: lambda master: master.status(),
    Command.STOP: queue_signal(signal.SIGTERM, "graceful stop started"),
    Command.RELOAD: queue_signal(signal.SIGHUP, "reload started (see status)"),
    Command.KILL_RETIRED: queue_signal(signal.SIGUSR1, "retiring workers are closing their connections"),
}
