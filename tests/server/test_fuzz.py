"""Property tests: no frame on /agent and no body on a Twirp route takes the server down.

The last test runs the bounded random frame generator of tests/server/fuzz_frames.py against
a `callboard server` process (short form in CI; CALLBOARD_FUZZ_INPUTS=100000 for the long
form, which scripts/reliability_report.py runs).

One server serves each whole property. Hypothesis drives plain functions that run coroutines
on an event loop this module owns (`Arena.run`); after each property a well-behaved worker
must still get and finish a job, and nothing may have been logged at ERROR level (aiohttp's
"Error handling request", asyncio's unretrieved task exceptions, the Twirp catch-all).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import pytest
from aiohttp import WSCloseCode
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livekit.protocol import agent, agent_dispatch, room

from callboard.server.app import EmbeddedServer
from callboard.server.config import ServerConfig
from callboard.server.twirp import HTTP_STATUS, JSON, PROTOBUF
from callboard.simworker import SimWorker
from tests.conftest import API_KEY, API_SECRET
from tests.reliability import env_int, record
from tests.server.fuzz_frames import MAX_RSS_GROWTH_MB, run_fuzz
from tests.server.support import (
    BYSTANDER,
    AgentClient,
    agent_token,
    assert_bystander_works,
    grant_token,
    start_bystander,
)

T = TypeVar("T")

EXAMPLE_DEADLINE_S: Final = 10.0
PROPERTY_SETTINGS: Final = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# How the server may close a connection it does not like, and never without a reason.
CLOSE_CODES: Final = {
    WSCloseCode.POLICY_VIOLATION,
    WSCloseCode.UNSUPPORTED_DATA,
    WSCloseCode.MESSAGE_TOO_BIG,
}


class ErrorRecords(logging.Handler):
    """Keeps every ERROR record, from any logger, for the arena to assert on."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Arena:
    """A server, a client session and a bystander worker on a loop this module drives."""

    loop: asyncio.AbstractEventLoop
    server: EmbeddedServer
    http: aiohttp.ClientSession
    bystander: SimWorker
    errors: ErrorRecords
    loop_errors: list[dict[str, Any]] = field(default_factory=list)
    rooms: Iterator[int] = field(default_factory=itertools.count)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one example's coroutine; a hang fails it instead of stalling the suite."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, EXAMPLE_DEADLINE_S))

    def assert_no_errors(self) -> None:
        """Nothing logged at ERROR and no unhandled exception on the loop."""
        assert not self.loop_errors, self.loop_errors
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]

    def assert_healthy(self) -> None:
        """No errors, the server answers, the bystander still gets and finishes a job."""
        self.assert_no_errors()
        self.run(self._check_health())
        self.run(
            assert_bystander_works(
                self.server, self.bystander, API_KEY, API_SECRET, f"r-health-{next(self.rooms)}"
            )
        )

    async def _check_health(self) -> None:
        async with self.http.get(self.server.http_url + "/") as resp:
            assert (resp.status, await resp.text()) == (200, "OK")


@pytest.fixture(scope="module")
def arena() -> Iterator[Arena]:
    loop = asyncio.new_event_loop()
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)

    async def start() -> Arena:
        server = EmbeddedServer(ServerConfig(port=0))
        await server.start()
        http = aiohttp.ClientSession()
        sim = await start_bystander(server, API_KEY, API_SECRET)
        return Arena(loop, server, http, sim, errors)

    arena = loop.run_until_complete(start())
    loop.set_exception_handler(lambda _, context: arena.loop_errors.append(context))
    try:
        yield arena
    finally:
        loop.run_until_complete(arena.bystander.aclose())
        loop.run_until_complete(arena.http.close())
        loop.run_until_complete(arena.server.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        logging.getLogger().removeHandler(errors)


# -- /agent --------------------------------------------------------------------------------------

texts = st.text(max_size=16)
job_ids = st.one_of(texts, st.from_regex(r"AJ_[2-9A-Za-z]{12}", fullmatch=True))
enums = st.integers(min_value=-2, max_value=6)
fuzz_agent_names = st.one_of(st.sampled_from(["", "fuzz"]), texts).filter(lambda n: n != BYSTANDER)


def _message(kind: str, value: Message) -> agent.WorkerMessage:
    msg = agent.WorkerMessage()
    getattr(msg, kind).CopyFrom(value)
    return msg


def _register(job_type: int, name: str, namespace: str, sources: list[int] | None) -> Message:
    req = agent.RegisterWorkerRequest(type=job_type, agent_name=name, namespace=namespace)  # type: ignore[arg-type]
    if sources is not None:
        req.allowed_permissions.can_publish = True
        req.allowed_permissions.can_publish_sources.extend(sources)  # type: ignore[arg-type]
    return req


def _update_worker(status: int | None, load: float, jobs: int, draining: bool, seq: int) -> Message:
    upd = agent.UpdateWorkerStatus(load=load, job_count=jobs, draining=draining, seq=seq)
    if status is not None:
        upd.status = status  # type: ignore[assignment]
    return upd


worker_messages: st.SearchStrategy[agent.WorkerMessage] = st.one_of(
    st.builds(
        lambda *args: _message("register", _register(*args)),
        enums,
        fuzz_agent_names,
        texts,
        st.none() | st.lists(enums, max_size=3),
    ),
    st.builds(
        lambda job, ok, term, ident, attrs: _message(
            "availability",
            agent.AvailabilityResponse(
                job_id=job,
                available=ok,
                terminate=term,
                participant_identity=ident,
                participant_attributes=attrs,
            ),
        ),
        job_ids,
        st.booleans(),
        st.booleans(),
        texts,
        st.dictionaries(texts, texts, max_size=3),
    ),
    st.builds(
        lambda *args: _message("update_worker", _update_worker(*args)),
        st.one_of(st.none(), enums),
        st.floats(width=32),
        st.integers(min_value=0, max_value=2**32 - 1),
        st.booleans(),
        st.integers(min_value=0, max_value=2**64 - 1),
    ),
    st.builds(
        lambda job, status, error: _message(
            "update_job", agent.UpdateJobStatus(job_id=job, status=status, error=error)
        ),
        job_ids,
        enums,
        texts,
    ),
    st.builds(
        lambda ts: _message("ping", agent.WorkerPing(timestamp=ts)),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ),
    st.builds(
        lambda ids, jobs: _message(
            "migrate_job",
            agent.MigrateJobRequest(job_ids=ids, jobs=[agent.Job(id=j) for j in jobs]),
        ),
        st.lists(job_ids, max_size=3),
        st.lists(job_ids, max_size=2),
    ),
    st.builds(
        lambda t: _message("simulate_job", agent.SimulateJobRequest(type=t)),
        enums,
    ),
    st.just(agent.WorkerMessage()),
)

probe_stamps = itertools.count(1)


async def probe(client: AgentClient) -> None:
    """After the fuzz frames the connection either answers a ping or was closed with a reason."""
    stamp = next(probe_stamps)
    # A ConnectionError means the server already closed: its close frame is still to be read.
    with contextlib.suppress(ConnectionError):
        await client.send(agent.WorkerMessage(ping=agent.WorkerPing(timestamp=stamp)))
    while True:
        frame = await client.ws.receive()
        if frame.type == aiohttp.WSMsgType.BINARY:
            msg = agent.ServerMessage.FromString(frame.data)
            if msg.WhichOneof("message") == "pong" and msg.pong.last_timestamp == stamp:
                return
        elif frame.type == aiohttp.WSMsgType.CLOSE:
            assert frame.data in CLOSE_CODES
            if frame.data != WSCloseCode.MESSAGE_TOO_BIG:
                assert frame.extra, "closed without a reason"
            return
        else:
            raise AssertionError(f"unexpected frame {frame.type!r} {frame.data!r}")


async def send_to_agent(arena: Arena, registered: bool, frames: list[bytes]) -> None:
    client = await AgentClient.connect(
        arena.server, agent_token(API_KEY, API_SECRET), session=arena.http
    )
    try:
        if registered:
            await client.register("fuzz")
        for frame in frames:
            if client.ws.closed:
                break
            try:
                await client.ws.send_bytes(frame)
            except ConnectionError:
                break
        await probe(client)
    finally:
        await client.aclose()


def test_random_bytes_on_agent_never_break_the_server(arena: Arena) -> None:
    @PROPERTY_SETTINGS
    @given(
        registered=st.booleans(), frames=st.lists(st.binary(max_size=128), min_size=1, max_size=3)
    )
    def example(registered: bool, frames: list[bytes]) -> None:
        arena.run(send_to_agent(arena, registered, frames))
        arena.assert_no_errors()

    example()
    arena.assert_healthy()


def test_out_of_order_worker_messages_never_break_the_server(arena: Arena) -> None:
    @PROPERTY_SETTINGS
    @given(registered=st.booleans(), messages=st.lists(worker_messages, min_size=1, max_size=4))
    def example(registered: bool, messages: list[agent.WorkerMessage]) -> None:
        frames = [m.SerializeToString() for m in messages]
        arena.run(send_to_agent(arena, registered, frames))
        arena.assert_no_errors()

    example()
    arena.assert_healthy()


# -- Twirp ---------------------------------------------------------------------------------------

REQUEST_TYPES: Final[dict[str, type[Message]]] = {
    "livekit.RoomService/CreateRoom": room.CreateRoomRequest,
    "livekit.RoomService/ListRooms": room.ListRoomsRequest,
    "livekit.RoomService/DeleteRoom": room.DeleteRoomRequest,
    "livekit.RoomService/ListParticipants": room.ListParticipantsRequest,
    "livekit.AgentDispatchService/CreateDispatch": agent_dispatch.CreateAgentDispatchRequest,
    "livekit.AgentDispatchService/DeleteDispatch": agent_dispatch.DeleteAgentDispatchRequest,
    "livekit.AgentDispatchService/ListDispatch": agent_dispatch.ListAgentDispatchRequest,
}
ROUTES: Final = [*REQUEST_TYPES, "livekit.RoomService/Nope", "livekit.Nope/CreateRoom", ""]
ALL_GRANTS: Final = grant_token(
    API_KEY, API_SECRET, room_create=True, room_list=True, room_admin=True, room="fuzz"
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def request_fields(route: str) -> list[FieldDescriptor]:
    fields: list[FieldDescriptor] = list(
        REQUEST_TYPES.get(route, room.CreateRoomRequest).DESCRIPTOR.fields  # type: ignore[arg-type]
    )
    return fields


def typed_json(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    """JSON values of roughly the field's type, so that many bodies decode and reach handlers."""
    scalar: st.SearchStrategy[Any]
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    if f.name == "room":
        scalar = st.sampled_from(["fuzz", "", "other"])
    elif f.type == FieldDescriptor.TYPE_STRING:
        scalar = st.text(max_size=12)
    elif f.type == FieldDescriptor.TYPE_BOOL:
        scalar = st.booleans()
    elif f.type == FieldDescriptor.TYPE_ENUM:
        assert f.enum_type is not None
        names = [v.name for v in f.enum_type.values]
        scalar = st.one_of(st.sampled_from(names), st.integers(min_value=-1, max_value=9))
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        scalar = st.dictionaries(st.text(max_size=8), json_values, max_size=3)
    elif f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        scalar = st.floats()
    else:
        scalar = st.integers(min_value=-(2**33), max_value=2**33)
    return st.lists(scalar, max_size=3) if f.is_repeated else scalar


def as_protobuf(route: str, value: dict[str, Any]) -> bytes:
    """`value` as the route's request message in protobuf (whatever of it json_format takes)."""
    msg = REQUEST_TYPES.get(route, room.CreateRoomRequest)()
    with contextlib.suppress(json_format.ParseError):
        json_format.ParseDict(value, msg, ignore_unknown_fields=True)
    return msg.SerializeToString()


def bodies(route: str, content_type: str) -> st.SearchStrategy[bytes]:
    fields = request_fields(route)
    names = sorted({f.name for f in fields} | {f.json_name for f in fields})
    shaped = st.dictionaries(st.sampled_from(names), json_values, max_size=4)
    typed = st.fixed_dictionaries(
        {},
        optional={(f.json_name if i % 2 else f.name): typed_json(f) for i, f in enumerate(fields)},
    )
    # Weighted towards bodies that decode: those are the ones that reach the handlers.
    if content_type == PROTOBUF:
        typed_body = typed.map(lambda v: as_protobuf(route, v))
        return st.one_of(st.binary(max_size=256), typed_body, typed_body)
    typed_body = typed.map(lambda v: json.dumps(v).encode())
    return st.one_of(
        st.binary(max_size=256),
        st.text(max_size=64).map(str.encode),
        json_values.map(lambda v: json.dumps(v).encode()),
        shaped.map(lambda v: json.dumps(v).encode()),
        typed_body,
        typed_body,
        typed_body,
    )


# Mostly requests that get past routing and auth to the decoder and the handler.
twirp_requests = st.tuples(
    st.sampled_from([*REQUEST_TYPES] * 3 + ROUTES),
    st.sampled_from([JSON] * 4 + [PROTOBUF] * 4 + ["text/plain"]),
).flatmap(
    lambda route_type: st.tuples(
        st.just(route_type[0]),
        st.sampled_from(["POST"] * 10 + ["GET", "PUT"]),
        st.just(route_type[1]),
        st.sampled_from([ALL_GRANTS] * 6 + [None, "not-a-token"]),
        bodies(*route_type),
    )
)


async def call_twirp(
    arena: Arena, route: str, method: str, content_type: str, token: str | None, body: bytes
) -> None:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{arena.server.http_url}/twirp/{route}"
    async with arena.http.request(method, url, data=body, headers=headers) as resp:
        payload = await resp.read()
        assert resp.status < 500, payload
        if resp.status == 200:
            assert resp.content_type == content_type
            return
        assert resp.content_type == JSON
        error = json.loads(payload)
        assert HTTP_STATUS[error["code"]] == resp.status
        assert isinstance(error["msg"], str) and error["msg"]


def test_random_twirp_requests_get_twirp_errors_never_500(arena: Arena) -> None:
    @PROPERTY_SETTINGS
    @given(request=twirp_requests)
    def example(request: tuple[str, str, str, str | None, bytes]) -> None:
        arena.run(call_twirp(arena, *request))
        arena.assert_no_errors()

    example()
    arena.assert_healthy()


# -- the frame generator against a server process -------------------------------------------

FUZZ_INPUTS_ENV: Final = "CALLBOARD_FUZZ_INPUTS"
FUZZ_INPUTS: Final = env_int(FUZZ_INPUTS_ENV, 8_000)
BYSTANDER_EVERY: Final = 2_000


@pytest.mark.timeout(120 + FUZZ_INPUTS // 200)
async def test_frame_generator_against_a_server_process(tmp_path: Path) -> None:
    """Malformed, truncated, huge and out-of-order /agent frames, bad Twirp bodies and raw
    HTTP, with unicode and over-long names: no 5xx, no ERROR line, no traceback, a clean exit,
    bounded memory, and the bystander finishes a job every BYSTANDER_EVERY inputs."""
    report = await run_fuzz(FUZZ_INPUTS, seed=6, workdir=tmp_path, bystander_every=BYSTANDER_EVERY)
    record("fuzz", {"inputs_env": FUZZ_INPUTS_ENV, **report.summary()})
    assert report.problems == []
    assert report.inputs == FUZZ_INPUTS
    assert report.server_exit == 0
    assert report.bystander_jobs >= FUZZ_INPUTS // BYSTANDER_EVERY
    assert report.rss_growth_mb <= MAX_RSS_GROWTH_MB
    assert min(report.agent_frames, report.twirp_requests, report.agent_handshakes) > 0
