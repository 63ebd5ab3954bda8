"""How a checkpoint that does not fit its architecture is reported: one clause per kind of problem.

Shared by the checkpoint check (pipeline.models.weights) and the ONNX import
(pipeline.models.onnx_import), so both name what does not fit the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

SHOWN = 8  # names per kind of problem; more are counted, not listed, to keep the error one paragraph


def describe_mismatch(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]) -> str:
    """``missing: a, b; unexpected: c; shape mismatch: d (8, 3) vs (8, 4)``, listing at most SHOWN names of each."""
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if names:
            more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
            parts.append(f"{label}: {', '.join(names[:SHOWN])}{more}")
    return "; ".join(parts)
