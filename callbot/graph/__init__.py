"""Acting on calls through Microsoft Graph: the call handle, operations, credentials.

``Call`` is the handle a handler receives; its methods send Graph's call
actions. Actions that start a Graph operation return an ``Operation`` to await.
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
from ._values import InvitationOptions, Target, media_info, media_prompt

__all__ = [
    "TEAMS_HOSTS",
    "AccessToken",
    "AsyncTokenCredential",
    "AudioRoutingGroups",
    "Call",
    "CallServices",
    "CertificateCredential",
    "ClientSecretCredential",
    "GraphClient",
    "GraphResponse",
    "InvitationOptions",
    "Meeting",
    "Operation",
    "Participants",
    "RetryPolicy",
    "Roster",
    "Target",
    "TokenCache",
    "media_info",
    "media_prompt",
    "parse_join_url",
]
