"""Probes of what ViTs use: tokens and the last layer, foreground vs background, frequency, spatial maps.

    python -m pipeline.probes experiment=probe_tokens images.path=/data/imagenet/val

Each probe plans units (one model x one slice of images), runs them on Ray,
commits each unit's sums to ``ROOT/probes/<probe>/part-<unit>.parquet`` and
aggregates them into a Markdown report and a PNG plot beside the parts.
"""

from pipeline.probes.base import Probe
from pipeline.probes.fgbg import ForegroundBackgroundProbe
from pipeline.probes.frequency import FrequencyProbe
from pipeline.probes.spatial import SpatialProbe
from pipeline.probes.tokens import TokensProbe

PROBES: dict[str, Probe] = {probe.name: probe for probe in (TokensProbe(), ForegroundBackgroundProbe(),
                                                            FrequencyProbe(), SpatialProbe())}
