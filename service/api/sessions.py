"""MONAI Label's sessions and uploaded images: an image sent once (``PUT /session/``, or ``PUT
/datastore/?image=ID`` as 3D Slicer's "upload" does) and segmented by id as often as a viewer asks. Held in this API process's memory,
bounded in count and bytes, and dropped when they expire: a session is a convenience for a
viewer, not storage (with several API replicas, route a viewer to one of them)."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from service.errors import PayloadTooLarge, ServiceError


class SessionNotFound(ServiceError):
    status, reason = 404, "session_not_found"


@dataclass
class Session:
    id: str
    files: list[bytes]
    names: list[str]
    expiry_s: int
    created: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return sum(len(f) for f in self.files)

    def info(self) -> dict:
        """The session as MONAI Label describes one (``SessionInfo.to_json``)."""
        return {
            "name": self.id, "path": "", "image": self.names[0] if len(self.names) == 1 else "", "meta": {"files": self.names},
            "create_ts": int(self.created), "last_access_ts": int(self.last_access), "expiry": int(self.created + self.expiry_s),
        }


class Sessions:
    def __init__(self, max_sessions: int, max_bytes: int, max_expiry_s: int) -> None:
        self.max_sessions, self.max_bytes, self.max_expiry_s = max_sessions, max_bytes, max_expiry_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def _expire(self) -> None:
        now = time.time()
        for key in [key for key, s in self._sessions.items() if s.last_access + s.expiry_s < now]:
            del self._sessions[key]

    def add(self, files: list[bytes], names: list[str], expiry_s: int, name: str | None = None) -> Session:
        """Keep ``files`` under a new id, or under ``name`` (an image uploaded by id, replaced if it exists)."""
        self._expire()
        expiry = self.max_expiry_s if expiry_s <= 0 else min(expiry_s, self.max_expiry_s)
        session = Session(name or uuid.uuid4().hex, files, names, expiry)
        self._sessions.pop(session.id, None)
        if session.size > self.max_bytes:
            raise PayloadTooLarge(f"a session of {session.size} bytes exceeds the limit of {self.max_bytes}")
        # the least recently used make room: a viewer that comes back after that uploads again
        while self._sessions and (len(self._sessions) >= self.max_sessions or self.size + session.size > self.max_bytes):
            self._sessions.popitem(last=False)
        self._sessions[session.id] = session
        return session

    def __contains__(self, session_id: str) -> bool:
        self._expire()
        return session_id in self._sessions

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def get(self, session_id: str) -> Session:
        self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r} (it may have expired); create one with PUT /session/")
        session.last_access = time.time()
        self._sessions.move_to_end(session_id)
        return session

    def remove(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        return session

    @property
    def size(self) -> int:
        return sum(s.size for s in self._sessions.values())
