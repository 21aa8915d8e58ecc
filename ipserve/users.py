"""Resolving the `user` and `group` settings (workers drop to them as root)."""

from __future__ import annotations

import grp
import os
import pwd


class UserError(Exception):
    pass


def _user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise UserError(f"no such user {user!r}") from None


def _group(group: str) -> grp.struct_group:
    try:
        return grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except KeyError:
        raise UserError(f"no such group {group!r}") from None


def primary_group(user: str) -> int:
    return _user(user).pw_gid


def ids(user: str, group: str | None) -> tuple[int, int]:
    entry = _user(user)
    return entry.pw_uid, (_group(group).gr_gid if group else entry.pw_gid)


def check(user: str | None, group: str | None) -> None:
    """Raise UserError if the settings cannot be applied by this process."""
    if user is None:
        if group is not None:
            raise UserError("group is set without user")
        return
    ids(user, group)
    if os.geteuid() != 0:
        raise UserError(f"user = {user!r} needs the master to start as root")
