"""Messages in the spirit of RFC 4475's torture tests (one per case it names, written for this
test), sent to the gateway over UDP: valid ones are answered, invalid ones get 400/505 or are
dropped, nothing takes the gateway down, and it answers an OPTIONS afterwards."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from callboard.server.app import EmbeddedServer
from callboard.server.sip.message import SipParseError, parse
from tests.server.sip.raw_sip import RawSipClient, request

BASE = (
    "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK{case}\r\n"
    "From: <sip:caller@example.com>;tag=t{case}\r\n"
    "To: <sip:callee@example.com>\r\n"
    "Call-ID: {case}@example.com\r\n"
)


@dataclass
class Case:
    name: str
    """RFC 4475 §3.1 case this message exercises."""
    text: str
    expect: int | None
    """Status of the gateway's answer; None: dropped without an answer."""


def msg(case: str, start: str, headers: str, body: str = "", length: int | None = None) -> str:
    size = len(body.encode()) if length is None else length
    head = start + "\r\n" + headers.format(case=case) + f"Content-Length: {size}\r\n\r\n"
    return head + body


def options(
    case: str, extra: str = "", start: str = "OPTIONS sip:callee@example.com SIP/2.0"
) -> str:
    return msg(case, start, BASE + extra + "CSeq: 1 OPTIONS\r\n")


VALID = [
    Case(
        "wsinv: folding, LWS around colons, compact forms, leading zeros, unknown headers",
        "OPTIONS sip:callee@example.com;unknownparam SIP/2.0\r\n"
        "TO :\r\n sip:callee@example.com ;   tag    = 1918181833n\r\n"
        'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\r\n'
        "  ;\r\n  tag = 98asjd8\r\n"
        "MaX-fOrWaRdS: 0068\r\ni: wsinv.ndaksdj@192.0.2.1\r\nContent-Length   : 0\r\n"
        "cseq: 0009\r\n  OPTIONS\r\nVia  : SIP/2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\n"
        "s :\r\nNewFangledHeader:   newfangled value\r\n continued newfangled value\r\n"
        "UnknownHeaderWithUnusualValue: ;;,,;;,;\r\nv:  SIP/2.0/TCP spindle.example.com   ;\r\n"
        "  branch  =   z9hG4bK9ikj8  ,\r\n SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n"
        ' z9hG4bK30239\r\nm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =\r\n'
        "      newvalue ;\r\n  secondparam ; q = 0.33\r\n\r\n",
        200,
    ),
    Case(
        "intmeth: an unusual but valid method token",
        msg(
            "intmeth",
            "!interesting-Method0123456789_*+`.%indeed'~ sip:callee@example.com SIP/2.0",
            BASE + "CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~\r\n",
        ),
        405,
    ),
    Case(
        "esc01: escaped characters in URIs",
        options("esc01", start="OPTIONS sip:sips%3Auser%40example.com@example.net SIP/2.0"),
        200,
    ),
    Case(
        "lwsdisp: a display name without quotes",
        msg(
            "lwsdisp",
            "OPTIONS sip:callee@example.com SIP/2.0",
            BASE.replace("From: <", "From: caller<") + "CSeq: 1 OPTIONS\r\n",
        ),
        200,
    ),
    Case(
        "longreq: very long header values",
        options("longreq", extra="X-Long: " + "x" * 4000 + "\r\n"),
        200,
    ),
    Case(
        "semiuri: a semicolon in the user part",
        options("semiuri", start="OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0"),
        200,
    ),
    Case(
        "transports: unknown transports in later Via entries",
        options("transports", extra="Via: SIP/2.0/SCTP a.example.com;branch=z9hG4bK1\r\n"),
        200,
    ),
    Case(
        "noreason: a response with no reason phrase (ignored by a UAS)",
        msg("noreason", "SIP/2.0 200", BASE + "CSeq: 1 OPTIONS\r\n"),
        None,
    ),
    Case(
        "dblreq: two requests in one datagram; the first is answered",
        options("dblreq") + options("dblreq2"),
        200,
    ),
]

INVALID = [
    Case(
        "clerr: Content-Length larger than the body",
        msg(
            "clerr",
            "OPTIONS sip:callee@example.com SIP/2.0",
            BASE + "CSeq: 1 OPTIONS\r\n",
            "abc",
            length=500,
        ),
        400,
    ),
    Case(
        "ncl: a negative Content-Length",
        msg(
            "ncl",
            "OPTIONS sip:callee@example.com SIP/2.0",
            BASE + "CSeq: 1 OPTIONS\r\n",
            length=-999,
        ),
        400,
    ),
    Case(
        "scalar02: a CSeq past 2**31-1",
        msg(
            "scalar02",
            "OPTIONS sip:callee@example.com SIP/2.0",
            BASE + "CSeq: 36893488147419103232 OPTIONS\r\n",
        ),
        400,
    ),
    Case(
        "mismatch01: CSeq method differs from the request method",
        msg("mismatch01", "OPTIONS sip:callee@example.com SIP/2.0", BASE + "CSeq: 1 INVITE\r\n"),
        400,
    ),
    Case(
        "ltgtruri: a Request-URI in angle brackets",
        options("ltgtruri", start="OPTIONS <sip:callee@example.com> SIP/2.0"),
        400,
    ),
    Case(
        "lwsruri: spaces inside the Request-URI",
        options("lwsruri", start="OPTIONS sip:callee@example.com; lr SIP/2.0"),
        400,
    ),
    Case(
        "lwsstart: several spaces in the start line",
        options("lwsstart", start="OPTIONS  sip:callee@example.com   SIP/2.0"),
        400,
    ),
    Case(
        "trws: trailing whitespace after the version",
        options("trws", start="OPTIONS sip:callee@example.com SIP/2.0 "),
        400,
    ),
    Case(
        "badvers: SIP/7.0", options("badvers", start="OPTIONS sip:callee@example.com SIP/7.0"), 505
    ),
    Case(
        "insuf: no Call-ID, From or To: nothing to address an answer to",
        "OPTIONS sip:callee@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKi\r\n"
        "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        None,
    ),
    Case(
        "bigcode: a response status past 699",
        "SIP/2.0 4294967301 better not break\r\n"
        + BASE.format(case="bigcode")
        + "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        None,
    ),
    Case("garbage: not SIP at all", "\x00\xff\x13GET / HTTP/1.1\r\n\r\n", None),
    Case(
        "badbranch: a bad Via host (answered to where it came from)",
        options("badbranch").replace("127.0.0.1:5999", "[::1"),
        400,
    ),
]


@pytest.mark.parametrize(
    "case", VALID + INVALID, ids=[c.name.split(":")[0] for c in VALID + INVALID]
)
async def test_torture_message(gateway: EmbeddedServer, case: Case) -> None:
    assert gateway.sip is not None
    phone = await RawSipClient.open(gateway.sip.port)
    try:
        phone.send(case.text.encode("utf-8", errors="surrogateescape"))
        answers = await phone.responses(timeout=0.5 if case.expect is None else 2.0)
        assert [a.status for a in answers[-1:]] == ([case.expect] if case.expect else [])
        [ok] = await phone.request(request("OPTIONS", gateway.sip.port))
        assert ok.status == 200, "the gateway still answers"
    finally:
        phone.close()


@pytest.mark.parametrize("case", VALID[:7], ids=[c.name.split(":")[0] for c in VALID[:7]])
def test_valid_torture_messages_parse(case: Case) -> None:
    parsed = parse(case.text.encode())
    assert parsed.method and parsed.call_id


@pytest.mark.parametrize("case", INVALID[:9], ids=[c.name.split(":")[0] for c in INVALID[:9]])
def test_invalid_torture_messages_are_refused_by_the_parser(case: Case) -> None:
    with pytest.raises(SipParseError):
        parse(case.text.encode())
