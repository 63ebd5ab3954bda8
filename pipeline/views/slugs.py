"""Safe file names for the atlas: every page and image of the site is named by a slug of a key or model.

A slug is the key or name itself when it holds only ``A-Za-z0-9_-`` (what the sweep makes), else those
characters plus a hash, so no record can name a file outside the site or break out of an attribute;
:func:`check_names` refuses a store whose records would share a file before anything is written, and
:func:`site_file` is the last check before a write.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pipeline.errors import PipelineError

_MAX_NAME = 100
_SAFE_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{_MAX_NAME}}}")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Fields the pages group, sort, link or format by: a record without one cannot be placed.
_NEEDED = ("model", "family", "weights", "target", "objective", "config_hash", "layer", "feature", "seed",
           "activation", "activation_trace", "steps", "image_size")


def key_slug(key: str) -> str:
    """The file name stem of a record's pages and images: the key itself when it is a safe name.

    A safe name is 1 to 100 of ``A-Z a-z 0-9 _ -`` (what the sweep's keys are). Anything else (markup,
    quotes, slashes, dots, ``..``, an absolute path, a very long key) keeps its safe characters and
    gets a hash of the whole key, so it can neither leave the site's folders nor break an attribute.
    """
    return _safe_name(key)


def model_slug(model: str) -> str:
    """A file name for a model page; names with '/', ':' or '.' get a hash so two never collide."""
    return _safe_name(model)


def _safe_name(text: str) -> str:
    if _SAFE_NAME.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    slug = _SLUG_UNSAFE.sub("_", text)[:_MAX_NAME].strip("_")
    return f"{slug}-{digest}" if slug else f"x-{digest}"


def check_names(rows: dict[str, dict]) -> None:
    """Refuse a store whose records cannot get distinct, safe file names (before anything is written)."""
    seen: dict[str, str] = {}
    for key, row in rows.items():
        if not isinstance(key, str) or not key:
            raise PipelineError(
                f"The store has a record with an empty key ({row.get('model')!r}, weights {row.get('weights')!r}, "
                f"layer {row.get('layer')}, feature {row.get('feature')}): the atlas names every page after "
                "its record's key. Remove or rewrite that record in the store (keys are made by the sweep)."
            )
        missing = [name for name in _NEEDED if row.get(name) is None]
        if missing:
            raise PipelineError(
                f"The store's record {key!r} has no {', '.join(missing)} (null), which the atlas needs to place "
                "it. Remove or rewrite that record in the store; records made by the sweep always have them."
            )
        name = key_slug(key)
        other = seen.setdefault(name.casefold(), key)  # case-insensitive file systems merge names by case
        if other != key:
            raise PipelineError(
                f"The store's records {other!r} and {key!r} would share the atlas page features/{name}.html "
                "(their keys differ only in characters a file name cannot hold safely, or in case). "
                "Rename or remove one of them in the store; keys made by the sweep never collide."
            )
    models: dict[str, str] = {}
    for model in sorted({row["model"] for row in rows.values()}):
        other = models.setdefault(model_slug(model).casefold(), model)
        if other != model:
            raise PipelineError(
                f"The store's models {other!r} and {model!r} would share the atlas page "
                f"models/{model_slug(model)}.html. Rename one of them in the store."
            )


def site_file(out: Path, folder: str, name: str) -> Path:
    """out/folder/name, for a name made of slugs: checked to stay inside the site, as a last line of defence."""
    path = out / folder / name
    if path.parent != out / folder or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise PipelineError(f"The atlas refused to write {name!r}: file names in the site are slugs of keys.")
    return path
