"""Where things are under a store root, and how commits are named and ordered (the layout is drawn in
pipeline.store.store's docstring)."""

from __future__ import annotations

import re
import urllib.parse
import uuid
from dataclasses import dataclass

from pipeline.store.schemas import SCHEMA_ID


@dataclass(frozen=True)
class StorePaths:
    """Paths inside the store's filesystem ('/'-separated, no scheme)."""

    root: str
    parquet: str
    webdataset: str
    failures: str
    plan: str

    @classmethod
    def under(cls, root: str) -> "StorePaths":
        return cls(root, f"{root}/parquet", f"{root}/webdataset", f"{root}/failures", f"{root}/plan")

    def shards(self, cid: str) -> tuple[str, str]:
        """(staged, final) paths of a commit's WebDataset shard."""
        return f"{self.webdataset}/.shard-{cid}.tar.staged", f"{self.webdataset}/shard-{cid}.tar"

    def record_part(self, model: str, cid: str) -> str:
        """The Parquet part of a commit's records of ``model``."""
        return f"{self.parquet}/{model_dir(model)}/part-{cid}.parquet"


def model_dir(model: str) -> str:
    """The hive partition directory of a model's parts: ``model=<percent-encoded name>``."""
    # quote() leaves '.' and '_' alone, but a leading one would make pyarrow skip
    # the directory as hidden; encoding it keeps those records visible.
    encoded = urllib.parse.quote(model, safe="")
    if encoded[:1] in (".", "_"):
        encoded = f"%{ord(encoded[0]):02X}{encoded[1:]}"
    return f"model={encoded}"


def id_between(name: str, prefix: str, suffix: str) -> str | None:
    """The id in a file name ``<prefix><id><suffix>`` (a commit id, a part id), or None for other names."""
    if name.startswith(prefix) and name.endswith(suffix):
        return name[len(prefix):-len(suffix)]
    return None


# The commit id of a part rewritten in this record schema: its old id plus the version ("-v3" today).
REWRITE_SUFFIX = "-" + SCHEMA_ID.rpartition("/")[2]
_REWRITTEN = re.compile(r"(.+)-v\d+")


def is_rewrite(cid: str) -> bool:
    return _REWRITTEN.fullmatch(cid) is not None


def superseded(committed: set[str]) -> set[str]:
    """Commit ids whose part a committed rewrite (``<id>-vN``) replaces."""
    return {match[1] for cid in committed if (match := _REWRITTEN.fullmatch(cid)) and match[1] in committed}


# A commit made under a lease carries the lease's epoch (pipeline.store.lease) in its id: e<epoch>-<uuid>.
_EPOCH = re.compile(r"e(\d{12})-")


def new_commit_id(epoch: int | None) -> str:
    return f"e{epoch:012d}-{uuid.uuid4().hex}" if epoch else uuid.uuid4().hex


def commit_order(cid: str) -> tuple[int, str]:
    """Which copy of a key committed twice counts: the one whose commit sorts first, by (epoch, commit id).
    Commits without an epoch (a writer without a lease, stores written before epochs) count as epoch 0."""
    match = _EPOCH.match(cid)
    return (int(match[1]) if match else 0), cid
