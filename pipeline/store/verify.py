"""Check a store's files against each other, and repair what can be repaired (through the store's file layer,
pipeline.store.files).

The records live twice: in a Parquet part (every column, the image included) and in
the WebDataset shard of the same commit (the image and the other columns as JSON).
So every shard can be checked against its part, record by record, and a damaged
shard can be rebuilt from its part without recomputing anything. A part that cannot
be read (truncated, a flipped bit caught by its page checksums) loses its records:
repair moves it, and its shard, to ``quarantine/`` under the store root, so the
units are no longer done and the next sweep recomputes them.

A flipped bit in a tar header is the case this exists for: Python's tarfile stops
at the bad header without an error, so a shard can silently hold fewer records
than its part; only the comparison finds it.

A key committed in two parts (a writer paused between its lease check and its commit
point: pipeline.store.lease) is a finding too. Readers already show the copy that counts
(``commit_order``: the lowest epoch, then the lowest commit id); repair removes the other
copies, from the part (rewritten without them, or deleted when nothing else is left) and
then from its shard (rebuilt from the rewritten part, or deleted with it).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.layout import commit_order, id_between
from pipeline.store.schemas import FAILURE_SCHEMA, RECORD_SCHEMA, UNIT_SCHEMA
from pipeline.store.shards import sample_layout, write_shard

if TYPE_CHECKING:
    from pipeline.store.store import Store

REBUILD, QUARANTINE = "rebuild the shard from its part", "move to quarantine/: its units are recomputed"
DEDUPLICATE = "remove those copies from this part and its shard"


@dataclass(frozen=True)
class Finding:
    path: str
    problem: str
    repair: str  # REBUILD, QUARANTINE or DEDUPLICATE
    commit_id: str | None = None
    keys: frozenset[str] = frozenset()  # DEDUPLICATE: the keys whose copy in this part goes


@dataclass
class VerifyReport:
    parts: int = 0
    shards: int = 0
    records: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def render(self) -> str:
        lines = [f"verified {self.parts} parts, {self.shards} shards, {self.records} records: "
                 + ("no damage found" if self.ok else f"{len(self.findings)} damaged file(s)")]
        lines += [f"  {f.path}: {f.problem} -> repair would {f.repair}" for f in self.findings]
        return "\n".join(lines)


def verify(store: "Store") -> VerifyReport:
    """Read every part in full (checksums verified) and every shard, and compare them record by record."""
    report = VerifyReport()
    copies: dict[str, list[tuple[tuple[int, str], str]]] = {}  # key -> (commit order, part path) of each copy
    for info in store.files.list(store.paths.parquet, recursive=True):
        commit_id = id_between(info.base_name, "part-", ".parquet")
        if commit_id is None:
            continue
        report.parts += 1
        try:
            part = _read_part(store, info.path, RECORD_SCHEMA)
        except (pa.ArrowException, OSError) as error:
            report.findings.append(Finding(info.path, f"unreadable part ({_first_line(error)})", QUARANTINE,
                                           commit_id))
            continue
        report.records += part.num_rows
        report.shards += 1
        for key in part["key"].to_pylist():
            copies.setdefault(key, []).append((commit_order(commit_id), info.path))
        problem = _compare_shard(store, commit_id, part)
        if problem:
            report.findings.append(Finding(store.paths.shards(commit_id)[1], problem, REBUILD, commit_id))
    report.findings += _duplicates(copies)
    for directory, schema in ((store.paths.failures, FAILURE_SCHEMA), (store.paths.plan, UNIT_SCHEMA)):
        for info in store.files.list(directory, recursive=False):
            if info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
                try:
                    _read_part(store, info.path, schema)
                except (pa.ArrowException, OSError) as error:
                    report.findings.append(Finding(info.path, f"unreadable ({_first_line(error)})", QUARANTINE))
    return report


def _duplicates(copies: dict[str, list[tuple[tuple[int, str], str]]]) -> list[Finding]:
    """One finding per part holding copies of keys that an earlier commit (``commit_order``) holds too."""
    losing: dict[str, tuple[tuple[int, str], list[str], str]] = {}  # part -> (its order, keys, the kept part)
    for key, found in copies.items():
        if len(found) > 1:
            found.sort()
            for order, path in found[1:]:
                losing.setdefault(path, (order, [], found[0][1]))[1].append(key)
    findings = []
    for path, ((epoch, commit_id), keys, kept) in sorted(losing.items()):
        findings.append(Finding(
            path, f"{len(keys)} duplicate key(s) (first: {min(keys)}) also committed in {kept}, whose copy counts "
                  f"(the lowest epoch, then commit id; this part's epoch is {epoch})", DEDUPLICATE, commit_id,
            frozenset(keys)))
    return findings


def repair(store: "Store", report: VerifyReport) -> list[str]:
    """Apply each finding's repair; returns one line per file repaired."""
    done = []
    for finding in report.findings:
        if finding.repair == DEDUPLICATE:
            done.append(_remove_copies(store, finding))
        elif finding.repair == REBUILD:
            part = next(info.path for info in store.files.list(store.paths.parquet, recursive=True)
                        if info.base_name == f"part-{finding.commit_id}.parquet")
            _rebuild_shard(store, finding.commit_id, _read_part(store, part, RECORD_SCHEMA))
            done.append(f"rebuilt {finding.path} from {part}")
        else:
            moved = [finding.path]
            if finding.commit_id is not None:
                staged, final = store.paths.shards(finding.commit_id)
                moved += [path for path in (final, staged) if store.files.is_file(path)]
            for path in moved:
                target = f"{store.paths.root}/quarantine/{posixpath.relpath(path, store.paths.root)}"
                store.files.move(path, target)
                done.append(f"moved {path} to {target}")
    return done


def _remove_copies(store: "Store", finding: Finding) -> str:
    """Rewrite a part without the keys another part holds too, then its shard; delete both if nothing is left.
    Killed between the two, the shard holds records its part does not: the next verify rebuilds it."""
    with store.filesystem.open_input_file(finding.path) as handle:
        part = pq.read_table(handle)  # as written: its own columns and schema id (a v1 part stays v1)
    kept = part.filter(pc.invert(pc.is_in(part["key"], value_set=pa.array(sorted(finding.keys), pa.string()))))
    if not kept.num_rows:
        store.retire(finding.commit_id, finding.path)
        return f"deleted {finding.path} and its shard: every record in it is committed in an earlier part"
    store.files.publish_parquet(finding.path, kept)
    _rebuild_shard(store, finding.commit_id, store.read_part(finding.path))
    return (f"removed {len(finding.keys)} duplicate record(s) from {finding.path} and its shard "
            f"({kept.num_rows} kept)")


def _read_part(store: "Store", path: str, schema: pa.Schema) -> pa.Table:
    return store.files.parquet([path], schema).to_table()


def _compare_shard(store: "Store", commit_id: str, part: pa.Table) -> str | None:
    """What is wrong with a committed part's shard, or None when it holds exactly the part's records."""
    try:
        with store.open_shard(commit_id) as stream:
            members = _tar_members(stream)
    except FileNotFoundError:
        return "missing shard"
    except (tarfile.TarError, OSError) as error:
        return f"unreadable shard ({_first_line(error)})"
    expected = {row["key"]: row["png"] for row in part.select(["key", "png"]).to_pylist()}
    missing = sorted(set(expected) - {key for key, ext in members if ext == "png"})
    if missing:
        return f"{len(missing)} of {len(expected)} records missing (first: {missing[0]})"
    extra = sorted({key for key, _ in members} - set(expected))
    if extra:
        return f"{len(extra)} records the part does not hold (first: {extra[0]})"
    for key, png in expected.items():
        if hashlib.sha256(members[(key, "png")]).digest() != hashlib.sha256(png).digest():
            return f"the image of {key} differs from the part's"
        try:
            if json.loads(members.get((key, "json"), b"{}")).get("key") != key:
                return f"the metadata of {key} is missing or names another key"
        except ValueError:
            return f"the metadata of {key} is not JSON"
    return None


def _tar_members(stream) -> dict[tuple[str, str], bytes]:
    """(key, extension) -> bytes of every member, read in one pass."""
    members = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                members[(key, ext)] = tar.extractfile(member).read()
    return members


def _rebuild_shard(store: "Store", commit_id: str, part: pa.Table) -> None:
    batch = (part, *sample_layout(part))
    store.files.publish(store.paths.shards(commit_id)[1], lambda out: write_shard(out, [batch]))


def _first_line(error: Exception) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
