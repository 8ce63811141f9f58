"""DropPrivileges: switch uid/gid and set the umask on 'start' (CherryPy-compatible).

Priority 77: after servers bind low ports (75 in CherryPy) and after PIDFile (70), so both can
still use root. Fixes over CherryPy: an unknown user/group name fails at construction with a
clear message; dropping the uid without a gid uses that user's primary group instead of
keeping gid 0; supplementary groups are cleared before the gid/uid change; and we verify root
cannot be regained.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Any

from .base import SimplePlugin


class DropPrivileges(SimplePlugin):
    """Drop to ``uid``/``gid`` (names or numbers) and apply ``umask`` when the bus starts."""

    def __init__(self, bus: Any, umask: int | None = None, uid: int | str | None = None,
                 gid: int | str | None = None) -> None:
        super().__init__(bus)
        self.finalized = False
        self.uid = uid
        self.gid = gid
        self.umask = umask

    @property
    def uid(self) -> int | None:
        """The uid to run as (a user name is resolved when set)."""
        return self._uid

    @uid.setter
    def uid(self, val: int | str | None) -> None:
        if isinstance(val, str):
            try:
                val = pwd.getpwnam(val).pw_uid
            except KeyError:
                raise ValueError(f"DropPrivileges: no such user {val!r}; "
                                 "create it or pass an existing user name or uid") from None
        self._uid = val

    @property
    def gid(self) -> int | None:
        """The gid to run as (a group name is resolved when set)."""
        return self._gid

    @gid.setter
    def gid(self, val: int | str | None) -> None:
        if isinstance(val, str):
            try:
                val = grp.getgrnam(val).gr_gid
            except KeyError:
                raise ValueError(f"DropPrivileges: no such group {val!r}; "
                                 "create it or pass an existing group name or gid") from None
        self._gid = val

    @property
    def umask(self) -> int | None:
        """The umask to set, e.g. 0o027."""
        return self._umask

    @umask.setter
    def umask(self, val: int | None) -> None:
        self._umask = val

    @staticmethod
    def _current_ids() -> tuple[str, str]:
        def name(get: Any, ident: int) -> str:
            try:
                return get(ident)[0]
            except KeyError:
                return str(ident)
        return name(pwd.getpwuid, os.getuid()), name(grp.getgrgid, os.getgid())

    def _drop(self) -> None:
        uid, gid = self.uid, self.gid
        if uid is not None and gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = None
        if uid is not None and os.geteuid() != 0 and uid != os.getuid():
            raise PermissionError(f"DropPrivileges: cannot switch to uid {uid} without root "
                                  f"(running as uid {os.getuid()}); start as root or drop uid=")
        self.bus.log("Started as uid: {!r} gid: {!r}".format(*self._current_ids()))
        if os.geteuid() == 0:
            os.setgroups([])
        if gid is not None:
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
            if uid != 0:
                try:
                    os.setuid(0)
                except PermissionError:
                    pass
                else:
                    raise RuntimeError("DropPrivileges: root could be regained after setuid; "
                                       "refusing to continue")
        self.bus.log("Running as uid: {!r} gid: {!r}".format(*self._current_ids()))

    def start(self) -> None:
        """Apply uid/gid, then the umask, once."""
        if self.finalized:
            if not (self.uid is None and self.gid is None):
                self.bus.log("Already running as uid: {!r} gid: {!r}".format(
                    *self._current_ids()))
            if self.umask is not None:
                self.bus.log(f"umask already set to: {self.umask:03o}")
            return
        if self.uid is None and self.gid is None:
            self.bus.log("uid/gid not set", level=30)
        else:
            self._drop()
        if self.umask is None:
            self.bus.log("umask not set", level=30)
        else:
            old = os.umask(self.umask)
            self.bus.log(f"umask old: {old:03o}, new: {self.umask:03o}")
        self.finalized = True

    start.priority = 77  # type: ignore[attr-defined]
