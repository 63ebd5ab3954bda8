"""Probes of what ViTs use: tokens and the last layer, foreground vs background, frequency, spatial maps.

    python -m pipeline probes experiment=probe_tokens images.path=/data/imagenet/val

Each probe plans units (one model x one slice of images), runs them on Ray,
commits each unit's sums to ``ROOT/probes/<probe>/part-<unit>.parquet`` and
aggregates them into a Markdown report and a PNG plot beside the parts.
"""

from pipeline.analysis.probes.base import Probe
from pipeline.analysis.probes.fgbg import ForegroundBackgroundProbe
from pipeline.analysis.probes.frequency import FrequencyProbe
from pipeline.analysis.probes.spatial import SpatialProbe
from pipeline.analysis.probes.tokens import TokensProbe

PROBES: dict[str, Probe] = {probe.name: probe for probe in (TokensProbe(), ForegroundBackgroundProbe(),
                                                            FrequencyProbe(), SpatialProbe())}
