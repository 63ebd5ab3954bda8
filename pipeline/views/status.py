"""``python -m pipeline.status store.root=DIR``: planned / done / failed per model and layer, from the store alone.

The store keeps every plan it was given (ROOT/plan/), its records and its
failures, so this needs no config, no Ray and no model: it works on a store
that a cluster job is still writing.
"""

from __future__ import annotations

import sys

from pipeline.errors import EXIT_BAD_INPUT, reporting_errors
from pipeline.store.store import Store

USAGE = "usage: python -m pipeline.status store.root=DIR"


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
    return "\n".join(lines)
