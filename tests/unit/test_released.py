"""Only the gate releases patient data: its released values refuse any other maker."""

from __future__ import annotations

from typing import Any

import pytest

from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.security import gate
from imaging_gateway.security.access import AccessContext
from imaging_gateway.security.principals import Principal

CTX = AccessContext(principal=Principal(subject="pacs", role="hospital", province="110000",
                                        token_id="t", hospital="H11010800028"))
LOCATION = InstanceLocation(
    StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.1", SOPInstanceUID="1.2.3.1.1",
    SOPClassUID="1.2.840.10008.5.1.4.1.1.2", TransferSyntaxUID="1.2.840.10008.1.2.1",
    store="bj", key="a.dcm", etag="e", size=10, header_bytes=4,
)


@pytest.mark.parametrize("token", [None, object(), "gate"])
def test_released_instances_refuse_a_maker_other_than_the_gate(token: Any) -> None:
    with pytest.raises(TypeError, match="released by the gate only"):
        gate.ReleasedInstances((LOCATION,), CTX, "retrieve", None, token)


@pytest.mark.parametrize("token", [None, object()])
def test_a_released_remote_study_refuses_a_maker_other_than_the_gate(token: Any) -> None:
    with pytest.raises(TypeError, match="released by the gate only"):
        gate.ReleasedRemoteStudy("310000", "1.2.3", None, "c", CTX, token)


def test_a_copy_or_a_keyword_call_needs_the_token_too() -> None:
    with pytest.raises(TypeError):
        gate.ReleasedInstances(instances=(LOCATION,), ctx=CTX, action="retrieve",
                               patient_token=None)  # type: ignore[call-arg]
    made = gate.ReleasedInstances((LOCATION,), CTX, "retrieve", None, gate._GATE)
    assert list(made) == [LOCATION] and len(made) == 1 and made.study_uid == "1.2.3"
    with pytest.raises(TypeError):
        # dataclasses.replace passes every field again, the token included: it works only
        # with the gate's own token, which a caller outside the module does not hold.
        gate.ReleasedInstances(made.instances, CTX, "retrieve", None, object())
