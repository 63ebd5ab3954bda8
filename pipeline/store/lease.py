"""A lease on a store: one live driver at a time writes a store's records (or one analysis job's parts),
and a driver that lost its lease (paused, cut off from the store) commits nothing more. Its files are
written, listed and deleted through the store's file layer (pipeline.store.files).

Two drivers committing the same plan into one store would both commit every key.
Object stores have no locks and pyarrow offers no conditional create, so the lease
is an election that needs only what every store has, listing after writing:

1. a driver writes its claim, ``leases/<name>/claim-<id>.json`` (host, pid, command),
   and a heartbeat ``leases/<name>/alive-<id>``, which it rewrites every
   ``expire_s / 9`` s while it holds the lease;
2. it lists the claims and drops the dead ones: a heartbeat older than ``expire_s``
   (``EXPIRE_S`` unless the driver sets it, ``store.lease_expire_s``), or a claim from
   this host whose process is gone (a driver killed with -9 on a laptop is taken over
   at once, not after the expiry). A claim that cannot be read (not JSON, not an object,
   a pid that is not a number) is named in the log and counts as dead once its heartbeat
   is that old;
3. the live claim written first wins: order by the file's modification time, which
   the filesystem or object store assigns, then by name. Two drivers that write at
   once both see both claims and agree on the winner; the loser deletes its claim
   and stops with a message that names the holder;
4. the winner takes the next *epoch*, the fencing token: it lists the grants,
   ``leases/<name>/epoch-<N>-<id>``, and writes ``epoch-<N+1>-<id>`` (then deletes the
   older grants); then it deletes the dead claims.

A lease alone cannot give exactly-once: a driver paused past the expiry (a VM migrated,
a stop-the-world pause, a partition from the store) cannot know that another took the
lease meanwhile. So a writer checks, right before each commit point, that it still holds
the lease (``check``): its claim is still there and its grant is the greatest, ordered by
(epoch, id), so that two winners who took the same epoch number (the first paused between
winning and granting) still agree on one. A writer that lost the lease stops (``LeaseLost``)
and commits nothing more. Each commit carries its writer's epoch (pipeline.store.writer), so
the duplicates that the gap between this check and the commit point can still let through
are resolved by one rule wherever records are read: the lowest epoch, then the lowest commit id.

Every failure after the claim is written removes the claim again, so a driver that fails
while acquiring or holding the lease leaves nothing behind (a kill -9 leaves it for the
next driver's step 2).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pipeline.store.errors import StoreError
from pipeline.store.files import StoreFiles

log = logging.getLogger(__name__)

# A heartbeat older than this is a dead driver's. Generous against clock skew between
# this machine and an object store, and against a driver stalled by a long commit.
EXPIRE_S = 90.0
# Heartbeats per expiry: a driver whose store is briefly unreachable misses a few beats, not its lease.
BEATS_PER_EXPIRY = 9

_GRANT = re.compile(r"epoch-(\d{12})-(.+)")


@dataclass(frozen=True)
class Claim:
    lease_id: str
    host: str
    pid: int
    command: str
    claimed_ns: int  # the claim file's modification time, as the store assigned it
    alive_ns: int | None  # the heartbeat's, None when it is missing
    malformed: str | None = None  # why the claim file could not be read, for one that cannot


class LeaseHeld(StoreError):
    """Another live driver holds the lease; the message says who and what to do."""


class LeaseLost(StoreError):
    """This driver's lease was taken over (it was paused or cut off past the expiry); it commits nothing more."""


class Lease:
    """Held from ``acquire()`` until ``release()``; a background thread renews the heartbeat."""

    def __init__(self, files: StoreFiles, store_root: str, directory: str, name: str, expire_s: float | None = None):
        self.files = files
        self.store_root = store_root  # as the user gave it, for messages
        self.directory = directory
        self.name = name
        self.expire_s = EXPIRE_S if expire_s is None else expire_s
        self.lease_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None  # the fencing token, once granted
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
        try:
            self.files.publish(self._claim_path(self.lease_id), lambda out: out.write(json.dumps(claim).encode()))
        except OSError as error:
            raise self._unwritable(error) from None
        try:
            self._beat()
            claims = self.claims()
            live = sorted((c for c in claims if self._alive(c)), key=lambda c: (c.claimed_ns, c.lease_id))
            if live and live[0].lease_id != self.lease_id:
                raise LeaseHeld(self._held_by(live[0]))
            self.epoch = self._grant()
            for dead in (c for c in claims if not self._alive(c)):
                if dead.malformed:
                    log.warning("removed the lease claim %s, which cannot be read (%s) and whose heartbeat "
                                "stopped", self._claim_path(dead.lease_id), dead.malformed)
                self._remove(dead.lease_id)
            self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
            self._thread.start()
        except BaseException as error:  # refused, or failed: this driver leaves no claim behind
            self._stop.set()
            self._remove(self.lease_id)
            if isinstance(error, OSError):
                raise self._unwritable(error) from None
            raise

    def release(self) -> None:
        self.stop_heartbeat()
        self._remove(self.lease_id)

    def stop_heartbeat(self) -> None:
        """Stop renewing the heartbeat; the claim stays, so the lease passes to another driver only once the
        heartbeat is past the expiry (what happens to the lease of a driver that is paused)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease: its claim is there and its grant is
        the greatest. Writers call it right before each commit point."""
        files = {info.base_name for info in self.files.list(self.directory, recursive=False)}
        grants = sorted(_grant_of(name) for name in files if _GRANT.fullmatch(name))
        mine = (self.epoch, self.lease_id)
        if f"claim-{self.lease_id}.json" in files and grants and grants[-1] == mine:
            return
        newer = next((g for g in reversed(grants) if g > mine), None)
        holder = next((c for c in self.claims() if newer and c.lease_id == newer[1]), None)
        who = (f" to {holder.command!r} (pid {holder.pid} on {holder.host}), at epoch {newer[0]}" if holder
               else f" at epoch {newer[0]}" if newer else "")
        raise LeaseLost(
            f"This driver lost its lease on {self.name} of the store {self.store_root!r} (epoch {self.epoch}): it "
            f"was paused or cut off from the store for more than {self.expire_s:g} s, and the lease passed{who}. "
            f"It stopped before its next commit, so nothing it computed since is committed twice; what it "
            f"committed before stays. The driver holding the lease now does the rest: `vit-atlas status "
            f"store.root={self.store_root}` shows progress, and running this command again once that driver "
            "has finished does whatever is still missing."
        )

    def _grant(self) -> int:
        """Step 4: write the next epoch's grant and delete the older ones; returns the epoch."""
        granted = [_grant_of(info.base_name) for info in self.files.list(self.directory, recursive=False)
                   if _GRANT.fullmatch(info.base_name)]
        epoch = 1 + max((number for number, _ in granted), default=0)
        self.files.publish(self._grant_path(epoch, self.lease_id), lambda out: out.write(b""))
        for number, lease_id in granted:  # the greatest stays the greatest: it decides "1 + the highest"
            self.files.delete_if_present(self._grant_path(number, lease_id))
        return epoch

    def _renew(self) -> None:
        while not self._stop.wait(self.expire_s / BEATS_PER_EXPIRY):
            try:
                self._beat()
            except OSError as error:  # a store that is briefly unreachable; the next beat may succeed
                log.warning("could not renew the store lease %s: %s", self.name, error)

    def _beat(self) -> None:
        self.files.publish(self._alive_path(self.lease_id), lambda out: out.write(b"alive"))

    def claims(self) -> list[Claim]:
        """Every claim on this lease, live or dead, as the store lists them."""
        files = {info.base_name: info for info in self.files.list(self.directory, recursive=False)}
        claims = []
        for name, info in files.items():
            if not (name.startswith("claim-") and name.endswith(".json")):
                continue
            lease_id = name[len("claim-"):-len(".json")]
            try:
                body = self.files.read(info.path)
            except OSError:
                continue  # gone since the listing
            alive = files.get(f"alive-{lease_id}")
            alive_ns = alive.mtime_ns if alive else None
            host, pid, command, malformed = _parse_claim(body)
            claims.append(Claim(lease_id, host, pid, command, info.mtime_ns or 0, alive_ns, malformed))
        return claims

    def _alive(self, claim: Claim) -> bool:
        if claim.lease_id == self.lease_id:
            return True
        if claim.alive_ns is None or time.time_ns() - claim.alive_ns > self.expire_s * 1e9:
            return False
        if claim.host == socket.gethostname() and not claim.malformed:
            try:
                os.kill(claim.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True  # another user's live process
        return True

    def _held_by(self, holder: Claim) -> str:
        seen = f"{(time.time_ns() - holder.alive_ns) / 1e9:.0f} s ago" if holder.alive_ns else "never"
        if holder.malformed:
            who = (f"a claim that cannot be read, {self._claim_path(holder.lease_id)} ({holder.malformed}), whose "
                   f"heartbeat was last written {seen}")
        else:
            who = f"{holder.command!r} (pid {holder.pid} on {holder.host}), last seen {seen}"
        return (f"Another driver is writing {self.name} of the store {self.store_root!r}: {who}. Two drivers on "
                f"one store would both compute and commit the same units. Wait for it to finish (`vit-atlas status "
                f"store.root={self.store_root}` shows progress) and run this command again; a driver that died "
                f"releases the store {self.expire_s:g} s after its last heartbeat (at once on the same machine).")

    def _unwritable(self, error: OSError) -> StoreError:
        reason = "it is on a read-only filesystem" if error.errno == errno.EROFS else f"{error.strerror or error}"
        return StoreError(
            f"The store {self.store_root!r} cannot be written: its lease directory {self.directory} refused a "
            f"write ({reason}). A driver must write its claim there before it computes anything, so that two "
            "drivers never write the same store. Mount the store writable (or fix its permissions), or choose "
            "another store.root; reading it (status, atlas, readers) needs no lease."
        )

    def _remove(self, lease_id: str) -> None:
        for path in (self._alive_path(lease_id), self._claim_path(lease_id)):
            try:
                self.files.delete_if_present(path)
            except OSError as error:  # a read-only store: there is nothing of ours to remove
                log.debug("could not remove %s: %s", path, error)

    def _claim_path(self, lease_id: str) -> str:
        return f"{self.directory}/claim-{lease_id}.json"

    def _alive_path(self, lease_id: str) -> str:
        return f"{self.directory}/alive-{lease_id}"

    def _grant_path(self, epoch: int, lease_id: str) -> str:
        return f"{self.directory}/epoch-{epoch:012d}-{lease_id}"


def _grant_of(name: str) -> tuple[int, str]:
    match = _GRANT.fullmatch(name)
    return int(match[1]), match[2]


def _parse_claim(body: bytes) -> tuple[str, int, str, str | None]:
    """(host, pid, command, why it is malformed or None) of a claim file's bytes."""
    try:
        claim = json.loads(body)
    except ValueError as error:  # also bytes that are not UTF-8
        return "", -1, "", f"not JSON: {str(error)[:80]}"
    if not isinstance(claim, dict):
        return "", -1, "", f"a JSON {type(claim).__name__}, not an object"
    host, pid, command = claim.get("host"), claim.get("pid"), claim.get("command")
    if not isinstance(host, str) or isinstance(pid, bool) or not isinstance(pid, int):
        return "", -1, "", f"host {host!r} and pid {pid!r} are not a name and a process id"
    return host, pid, str(command), None
