"""A lease on a store: one live driver at a time writes a store's records (or one analysis job's parts).

Two drivers committing the same plan into one store would both commit every key.
Object stores have no locks and pyarrow offers no conditional create, so the lease
is an election that needs only what every store has, listing after writing:

1. a driver writes its claim, ``leases/<name>/claim-<id>.json`` (host, pid, command),
   and a heartbeat ``leases/<name>/alive-<id>``, which it rewrites every
   ``RENEW_S`` while it holds the lease;
2. it lists the claims and drops the dead ones: a heartbeat older than ``EXPIRE_S``,
   or a claim from this host whose process is gone (a driver killed with -9 on a
   laptop is taken over at once, not after the expiry);
3. the live claim written first wins: order by the file's modification time, which
   the filesystem or object store assigns, then by name. Two drivers that write at
   once both see both claims and agree on the winner; the loser deletes its claim
   and stops with a message that names the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.store.errors import StoreError

if TYPE_CHECKING:
    from pipeline.store.store import Store

log = logging.getLogger(__name__)

RENEW_S = 10.0
# A heartbeat older than this is a dead driver's. Generous against clock skew between
# this machine and an object store, and against a driver stalled by a long commit.
EXPIRE_S = 90.0


@dataclass(frozen=True)
class Claim:
    lease_id: str
    host: str
    pid: int
    command: str
    claimed_ns: int  # the claim file's modification time, as the store assigned it
    alive_ns: int | None  # the heartbeat's, None when it is missing


class LeaseHeld(StoreError):
    """Another live driver holds the lease; the message says who and what to do."""


class Lease:
    """Held from ``acquire()`` until ``release()``; a background thread renews the heartbeat."""

    def __init__(self, store: "Store", name: str):
        self.store = store
        self.name = name
        self.directory = f"{store.paths.root}/leases/{name}"
        self.lease_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> None:
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:500]}
        self.store._publish(self._claim_path(self.lease_id), lambda out: out.write(json.dumps(claim).encode()))
        self._beat()
        live = sorted((c for c in self._claims() if self._alive(c)), key=lambda c: (c.claimed_ns, c.lease_id))
        if live and live[0].lease_id != self.lease_id:
            self._remove(self.lease_id)
            holder = live[0]
            seen = (f"{(time.time_ns() - holder.alive_ns) / 1e9:.0f} s ago" if holder.alive_ns else "never")
            raise LeaseHeld(
                f"Another driver is writing {self.name} of the store {self.store.root!r}: {holder.command!r} "
                f"(pid {holder.pid} on {holder.host}), last seen {seen}. Two drivers on one store would both "
                f"compute and commit the same units. Wait for it to finish (`vit-atlas status "
                f"store.root={self.store.root}` shows progress) and run this command again; a driver that died "
                f"releases the store {EXPIRE_S:.0f} s after its last heartbeat (at once on the same machine)."
            )
        for dead in (c for c in self._claims() if not self._alive(c)):
            self._remove(dead.lease_id)
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove(self.lease_id)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._beat()
            except OSError as error:  # a store that is briefly unreachable; the next beat may succeed
                log.warning("could not renew the store lease %s: %s", self.name, error)

    def _beat(self) -> None:
        self.store._publish(self._alive_path(self.lease_id), lambda out: out.write(b"alive"))

    def _claims(self) -> list[Claim]:
        files = {info.base_name: info for info in self.store._list(self.directory, recursive=False)}
        claims = []
        for name, info in files.items():
            if not (name.startswith("claim-") and name.endswith(".json")):
                continue
            lease_id = name[len("claim-"):-len(".json")]
            try:
                with self.store.filesystem.open_input_stream(info.path) as handle:
                    body = json.loads(handle.read())
            except (OSError, ValueError):
                continue  # gone since the listing, or being written: not a claim yet
            alive = files.get(f"alive-{lease_id}")
            claims.append(Claim(lease_id, str(body.get("host")), int(body.get("pid", -1)), str(body.get("command")),
                                info.mtime_ns or 0, alive.mtime_ns if alive else None))
        return claims

    def _alive(self, claim: Claim) -> bool:
        if claim.lease_id == self.lease_id:
            return True
        if claim.alive_ns is None or time.time_ns() - claim.alive_ns > EXPIRE_S * 1e9:
            return False
        if claim.host == socket.gethostname():
            try:
                os.kill(claim.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True  # another user's live process
        return True

    def _remove(self, lease_id: str) -> None:
        for path in (self._alive_path(lease_id), self._claim_path(lease_id)):
            self.store._delete_if_present(path)

    def _claim_path(self, lease_id: str) -> str:
        return f"{self.directory}/claim-{lease_id}.json"

    def _alive_path(self, lease_id: str) -> str:
        return f"{self.directory}/alive-{lease_id}"

