"""The weights id every record carries, parsed and written in one place.

``random-<seed>``, ``planted-<version>-<seed>``, ``pretrained-<tag>[@<revision>]`` (the hub commit, or
``sha256-<hex>`` of a file timm downloads from a URL; ids from before they named a revision have none) or
``sha256-<hex of the checkpoint file>``. :mod:`pipeline.models.weights` makes them; the views read them.
A module of its own, without timm (which costs seconds to import), for the atlas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import PipelineError

REVISION = re.compile(r"[0-9a-f]{40}")  # a hub commit, as the hub's cache names its snapshot directories
_SHA256 = r"sha256-[0-9a-f]{64}"
_WEIGHTS_ID = re.compile(
    r"random-(?P<random_seed>-?\d+)"
    r"|planted-(?P<version>[^-\s]+)-(?P<planted_seed>-?\d+)"
    rf"|pretrained-(?P<tag>[^@\s]+)(?:@(?P<revision>[0-9a-f]{{40}}|{_SHA256}))?"
    rf"|(?P<file>{_SHA256})"
)


@dataclass(frozen=True)
class WeightsId:
    kind: str  # random | planted | pretrained | file (as WeightsChoice.kind)
    seed: int | None = None  # random, planted: torch's seed for the init
    version: str | None = None  # planted: the construction's version (pipeline.models.planted.PLANTED_VERSION)
    tag: str | None = None  # pretrained: timm's pretrained tag ("default" for an untagged name)
    revision: str | None = None  # pretrained: which bytes (see the module docstring); None in older ids
    digest: str | None = None  # file: the sha256 hex digest of the checkpoint's bytes

    @classmethod
    def parse(cls, text: str) -> WeightsId:
        found = cls.parse_or_none(text)
        if found is None:
            raise PipelineError(f"'{text}' is not a weights id: expected random-<seed>, planted-<version>-<seed>, "
                                f"pretrained-<tag>[@<revision>] or sha256-<hex digest of a checkpoint file>.")
        return found

    @classmethod
    def parse_or_none(cls, text: str) -> WeightsId | None:
        """The id, or None for text that is none (a record of a store written by hand or by another tool)."""
        match = _WEIGHTS_ID.fullmatch(text)
        if match is None:
            return None
        if match["random_seed"] is not None:
            return cls("random", seed=int(match["random_seed"]))
        if match["planted_seed"] is not None:
            return cls("planted", seed=int(match["planted_seed"]), version=match["version"])
        if match["tag"] is not None:
            return cls("pretrained", tag=match["tag"], revision=match["revision"])
        return cls("file", digest=match["file"].removeprefix("sha256-"))

    def __str__(self) -> str:
        if self.kind == "random":
            return f"random-{self.seed}"
        if self.kind == "planted":
            return f"planted-{self.version}-{self.seed}"
        if self.kind == "pretrained":
            return f"pretrained-{self.tag}" + (f"@{self.revision}" if self.revision else "")
        return f"sha256-{self.digest}"

    @property
    def short(self) -> str:
        """Short enough for a table row or a caption: a file's sha256 cut to 12 hex digits, a hub revision (or a
        downloaded file's sha256) to 12 characters."""
        if self.kind == "file":
            return f"sha256-{self.digest[:12]}"
        if self.kind == "pretrained" and self.revision:
            revision = self.revision[:12] if REVISION.fullmatch(self.revision) else self.revision[:19]
            return f"pretrained-{self.tag}@{revision}"
        return str(self)


def short_id(text: str) -> str:
    """:attr:`WeightsId.short` of a record's weights, or the text as it is where it is no weights id."""
    found = WeightsId.parse_or_none(text)
    return found.short if found else text
