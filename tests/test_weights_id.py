"""The weights id: one parser and writer for every kind of weights a record can carry."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.models.weights_id import WeightsId, short_id
from pipeline.views.pages import weights_kind

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DIGEST = "ab" * 32

IDS = {
    "random-3": WeightsId("random", seed=3),
    "planted-v1-0": WeightsId("planted", seed=0, version="v1"),
    "pretrained-fb_in1k": WeightsId("pretrained", tag="fb_in1k"),  # from before ids named a revision
    f"pretrained-augreg_in21k_ft_in1k@{COMMIT}": WeightsId("pretrained", tag="augreg_in21k_ft_in1k", revision=COMMIT),
    f"pretrained-default@sha256-{DIGEST}": WeightsId("pretrained", tag="default", revision=f"sha256-{DIGEST}"),
    f"sha256-{DIGEST}": WeightsId("file", digest=DIGEST),
}


@pytest.mark.parametrize("text", IDS)
def test_every_kind_of_weights_id_round_trips(text):
    assert WeightsId.parse(text) == IDS[text]
    assert str(IDS[text]) == text
    assert weights_kind(text) == IDS[text].kind


def test_short_ids_cut_digests_and_revisions_and_keep_the_rest():
    assert [short_id(text) for text in IDS] == [
        "random-3", "planted-v1-0", "pretrained-fb_in1k", f"pretrained-augreg_in21k_ft_in1k@{COMMIT[:12]}",
        f"pretrained-default@sha256-{DIGEST[:12]}", f"sha256-{DIGEST[:12]}"]


@pytest.mark.parametrize("text", ["random-x", "random-0\"><b>", "planted-v1", "pretrained-", "pretrained-a@b",
                                  "sha256-ab", f"sha256-{DIGEST}0", "hf-hub:timm/x", ""])
def test_text_that_is_no_weights_id_is_refused_in_one_paragraph_and_shown_as_other(text):
    with pytest.raises(PipelineError, match="is not a weights id") as raised:
        WeightsId.parse(text)
    assert "\n" not in str(raised.value)
    assert WeightsId.parse_or_none(text) is None and weights_kind(text) == "other" and short_id(text) == text
