"""Status of a store: planned / done / failed per model and layer, from the store alone; and its verification.

The store keeps every plan it was given (ROOT/plan/), its records and its
failures, so this needs no config, no Ray and no model: it works on a store
that a cluster job is still writing. "done" counts the keys of the Parquet
parts; ``verify`` reads every part and shard and compares them.
"""

from __future__ import annotations

from collections import Counter

from pipeline.store.errors import repair_command
from pipeline.store.schemas import SCHEMA_ID, UNMEASURED_SCHEMA_IDS
from pipeline.store.store import Store


def render(store: Store) -> str:
    rows = store.status().sort_by([("model", "ascending"), ("layer", "ascending")]).to_pylist()
    if not rows:
        return f"store {store.root}: no plan and no records yet."
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"store {store.root}", f"{'model':<{width}}  {'layer':>5}  {'planned':>8}  {'done':>8}  {'failed':>6}"]
    totals = [0, 0, 0]
    for row in rows:
        lines.append(f"{row['model']:<{width}}  {row['layer']:>5}  {row['planned']:>8}  {row['done']:>8}  "
                     f"{row['failed']:>6}")
        totals = [t + row[c] for t, c in zip(totals, ("planned", "done", "failed"))]
    lines.append(f"{'total':<{width}}  {'':>5}  {totals[0]:>8}  {totals[1]:>8}  {totals[2]:>6}")
    lines.append(versions_line(store))
    return "\n".join(lines)


def versions_line(store: Store) -> str:
    """Which record schema the store's parts were written with, and how to bring older ones up to date."""
    counts = Counter(store.versions().values())
    if not counts:
        return "record schema: no parts yet"
    listed = ", ".join(f"{count} part{'' if count == 1 else 's'} {schema}" for schema, count in sorted(counts.items()))
    unmeasured = sum(count for schema, count in counts.items() if schema in UNMEASURED_SCHEMA_IDS)
    hint = (f"; `vit-atlas describe store.root={store.root}` rewrites the unmeasured ones as {SCHEMA_ID}, with "
            "their descriptors" if unmeasured else "")
    return f"record schema: {listed}{hint}"


def verification(store: Store, repair: bool) -> tuple[str, bool]:
    """The verify report (and what repair did); True when the store is (now) sound."""
    report = store.verify()
    lines = [report.render()]
    if report.ok:
        return lines[0], True
    if not repair:
        lines.append(f"run `{repair_command(store.root)}` to repair it.")
        return "\n".join(lines), False
    lines += [f"  {line}" for line in store.repair(report)]
    after = store.verify()
    lines.append(f"after repair: {after.render()}")
    return "\n".join(lines), after.ok
