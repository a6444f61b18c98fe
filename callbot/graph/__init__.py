"""Acting on calls through Microsoft Graph: the call handle, operations, credentials.

``Call`` is the handle a handler receives; its methods send Graph's call
actions. Actions that start a Graph operation return an ``Operation`` to await.
An argument whose Graph type is an enum is typed with the members it takes
(``RejectReason``, ``Modality``, ...) and checked before anything is sent.
``CallServices`` owns the Graph client, the handles and the operation
bookkeeping; ``CallBot`` creates one.
"""

from __future__ import annotations

from ._call import AudioRoutingGroups, Call, Participants, Roster
from ._client import GraphClient, GraphResponse
from ._credentials import (
    AccessToken,
    AsyncTokenCredential,
    CertificateCredential,
    ClientSecretCredential,
    TokenCache,
)
from ._http import RetryPolicy
from ._meetings import TEAMS_HOSTS, Meeting, parse_join_url
from ._operations import Operation
from ._services import CallServices
from ._values import (
    EndpointType,
    InvitationOptions,
    Modality,
    RecordingStatus,
    RejectReason,
    RoutingMode,
    RoutingPolicy,
    ScreenSharingRole,
    Target,
    ToneName,
    media_info,
    media_prompt,
)

__all__ = [
    "TEAMS_HOSTS",
    "AccessToken",
    "AsyncTokenCredential",
    "AudioRoutingGroups",
    "Call",
    "CallServices",
    "CertificateCredential",
    "ClientSecretCredential",
    "EndpointType",
    "GraphClient",
    "GraphResponse",
    "InvitationOptions",
    "Meeting",
    "Modality",
    "Operation",
    "Participants",
    "RecordingStatus",
    "RejectReason",
    "RetryPolicy",
    "Roster",
    "RoutingMode",
    "RoutingPolicy",
    "ScreenSharingRole",
    "Target",
    "TokenCache",
    "ToneName",
    "media_info",
    "media_prompt",
    "parse_join_url",
]
