"""SIP headers of an INVITE as participant attributes (livekit-sip `pkg/sip/types.go`
HeadersToAttrs and `participant.go` headerToAttr): all or X- headers as `sip.h.<name>`, known
provider headers under their own names, the trunk's own mapping, the call's tag and Call-ID."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from livekit.protocol import sip

from callboard.server.sip.message import SipMessage

HEADER_PREFIX: Final = "sip.h."
ATTR_CALL_TAG: Final = "sip.callTag"
ATTR_CALL_ID_FULL: Final = "sip.callIDFull"
PROVIDER_HEADERS: Final = {
    "X-Twilio-AccountSid": "sip.twilio.accountSid",
    "X-Twilio-CallSid": "sip.twilio.callSid",
    "X-call_leg_id": "sip.telnyx.callLegID",
    "X-call_session_id": "sip.telnyx.callSessionID",
    "X-Amzn-ConnectContactId": "sip.amazon.contactId",
    "X-Amzn-ConnectInitialContactId": "sip.amazon.initialContactId",
    "X-Amzn-SourceAccount": "sip.amazon.sourceAccount",
    "X-Amzn-SourceArn": "sip.amazon.sourceArn",
    "X-Amzn-TargetArn": "sip.amazon.targetArn",
    "X-Lk-Test-Id": "lktest.id",
}


def header_attributes(
    invite: SipMessage, mapping: Mapping[str, str], include: int
) -> dict[str, str]:
    """The attributes `invite`'s headers give the caller's participant."""
    attrs: dict[str, str] = {}
    if include != sip.SIP_NO_HEADERS:
        for name, value in invite.headers:
            lower = name.lower()
            if include == sip.SIP_X_HEADERS and not lower.startswith("x-"):
                continue
            attrs[HEADER_PREFIX + lower] = value
    for header, attr in (*PROVIDER_HEADERS.items(), *mapping.items()):
        value = invite.get(header)
        if value:
            attrs[attr] = value
    tag = invite.from_.tag
    if tag:
        attrs[ATTR_CALL_TAG] = tag
    attrs[ATTR_CALL_ID_FULL] = invite.call_id
    return attrs
