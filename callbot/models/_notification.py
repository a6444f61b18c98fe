"""One item of the ``commsNotifications`` body Graph posts to the bot."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ._base import GraphModel, odata_type_field
from ._common import ChangeType

__all__ = ["CommsNotification"]


class CommsNotification(GraphModel):
    """One notification item: what changed (``change_type``), where, and the new data.

    ``resource_url`` (``/communications/calls/...``) and the older ``resource``
    (``/app/calls/...``) name the changed resource; at least one is set.
    ``resource_data`` is kept as sent (an object, a list, or absent): its model
    depends on the resource path. ``callback_uri`` is the bot's callback the
    notification was sent to, when Graph includes it. ``subscription_id`` and
    ``subscription_expiration_date_time`` appear in the oldest documented form.
    """

    odata_type: str | None = odata_type_field("#microsoft.graph.commsNotification")
    change_type: ChangeType | None = None
    resource_url: str | None = None
    resource: str | None = None
    resource_data: Any = None
    callback_uri: str | None = None
    subscription_id: str | None = None
    subscription_expiration_date_time: datetime | None = None
