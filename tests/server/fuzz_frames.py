"""A bounded random frame generator against a `callboard server` process: /agent WebSocket
sessions and Twirp requests, with a well-behaved worker beside them.

What it sends (each frame on /agent, each /agent handshake and each Twirp request is one
input): random bytes; valid WorkerMessages truncated, bit-flipped, spliced or doubled; deeply
nested protobuf; text frames; frames over the 1 MiB limit; valid messages in the wrong order
(no register, register twice, answers to offers never made), with duplicated and unknown job
ids, unicode and very long agent names, errors and attributes; workers that register for
agent `fuzz` and answer real offers twice, late or wrongly; Twirp bodies in JSON and protobuf
that are malformed, truncated, huge, or valid with unicode and over-long room names and
metadata, with good, wrong-room, garbage or missing tokens.

What must hold: the server never answers 5xx, closes a bad /agent connection with a reason (or
1009), logs nothing at ERROR and prints no traceback, stays up, keeps its memory bounded (RSS
after the warm-up vs at the end), and the bystander (callboard.simworker.SimWorker) gets and
finishes a job every `bystander_every` inputs.

`python -m tests.server.fuzz_frames --inputs 100000` is the long form (scripts/
reliability_report.py runs it); tests/server/test_fuzz.py runs a short form in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from livekit import api
from livekit.protocol import agent, agent_dispatch, room

from callboard.simworker import SimWorker, agent_token
from tests.subprocs import ServerProcess, Twirp, free_port, json_lines, memory, non_json_lines

KEY: Final = "fuzzkey"
AGENT_LANES: Final = 4
TWIRP_LANES: Final = 3
WARM_UP_SHARE: Final = 0.05
"""Server memory is measured from the end of the first 5 % of inputs (imports, caches)."""
MAX_RSS_GROWTH_MB: Final = 16.0
BYSTANDER: Final = "bystander"
BYSTANDER_DEADLINE_S: Final = 10.0
SESSION_TIMEOUT_S: Final = 15.0
ROOM_POOL: Final = 48
FRAME_LIMIT: Final = 1 << 20
ROUTES: Final = (
    "livekit.RoomService/CreateRoom",
    "livekit.RoomService/ListRooms",
    "livekit.RoomService/DeleteRoom",
    "livekit.RoomService/ListParticipants",
    "livekit.AgentDispatchService/CreateDispatch",
    "livekit.AgentDispatchService/DeleteDispatch",
    "livekit.AgentDispatchService/ListDispatch",
)
REQUEST_TYPES: Final[dict[str, type[Any]]] = {
    "livekit.RoomService/CreateRoom": room.CreateRoomRequest,
    "livekit.RoomService/ListRooms": room.ListRoomsRequest,
    "livekit.RoomService/DeleteRoom": room.DeleteRoomRequest,
    "livekit.RoomService/ListParticipants": room.ListParticipantsRequest,
    "livekit.AgentDispatchService/CreateDispatch": agent_dispatch.CreateAgentDispatchRequest,
    "livekit.AgentDispatchService/DeleteDispatch": agent_dispatch.DeleteAgentDispatchRequest,
    "livekit.AgentDispatchService/ListDispatch": agent_dispatch.ListAgentDispatchRequest,
}
CLOSE_CODES: Final = {1008, 1003, 1009}
UNICODE: Final = "ñ☎通話🙂\u200b\u2028é\U0001f4de\x00"


@dataclass
class FuzzReport:
    inputs: int = 0
    agent_frames: int = 0
    agent_handshakes: int = 0
    twirp_requests: int = 0
    raw_requests: int = 0
    sessions: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    twirp_statuses: Counter[int] = field(default_factory=Counter)
    bystander_jobs: int = 0
    problems: list[str] = field(default_factory=list)
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    wall_s: float = 0.0
    server_exit: int | None = None

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_warm_mb

    def summary(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "agent_frames": self.agent_frames,
            "agent_handshakes": self.agent_handshakes,
            "twirp_requests": self.twirp_requests,
            "raw_http_requests": self.raw_requests,
            "sessions": dict(sorted(self.sessions.items())),
            "closes": {str(k): v for k, v in sorted(self.closes.items())},
            "twirp_statuses": {str(k): v for k, v in sorted(self.twirp_statuses.items())},
            "bystander_jobs": self.bystander_jobs,
            "problems": len(self.problems),
            "server_rss_warm_mb": round(self.rss_warm_mb, 1),
            "server_rss_end_mb": round(self.rss_end_mb, 1),
            "server_rss_peak_mb": round(self.rss_peak_mb, 1),
            "server_exit": self.server_exit,
            "wall_s": round(self.wall_s, 1),
        }


# -- generators ----------------------------------------------------------------------------


class Gen:
    """Random inputs from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self, long: bool = False) -> str:
        r = self.rng
        kind = r.random()
        if long or kind < 0.05:
            return "".join(r.choice(UNICODE + "ab") for _ in range(r.choice((257, 1000, 70000))))
        if kind < 0.3:
            return "".join(r.choice(UNICODE) for _ in range(r.randint(1, 12)))
        if kind < 0.4:
            return ""
        return "".join(r.choice("abcXYZ_-0123 ") for _ in range(r.randint(1, 24)))

    def job_id(self, known: list[str]) -> str:
        r = self.rng
        if known and r.random() < 0.5:
            return r.choice(known)
        return r.choice(["", "AJ_" + secrets.token_urlsafe(9)[:12], self.text()])

    def worker_message(self, known: list[str]) -> agent.WorkerMessage:
        r = self.rng
        kind = r.randrange(8)
        m = agent.WorkerMessage()
        if kind == 0:
            m.register.type = r.choice([0, 1, 2, 7, -1])  # type: ignore[assignment]
            m.register.agent_name = r.choice(["fuzz", "", BYSTANDER + "-not", self.text()])
            m.register.namespace = r.choice(["", self.text()])
            m.register.version = self.text()
            if r.random() < 0.3:
                m.register.allowed_permissions.can_publish_sources.extend(
                    r.choice([[1, 2], [99], [-3]])  # type: ignore[arg-type]
                )
        elif kind == 1:
            a = m.availability
            a.job_id = self.job_id(known)
            a.available = r.random() < 0.7
            a.terminate = r.random() < 0.1
            a.participant_identity = self.text()
            a.participant_name = self.text()
            a.participant_metadata = self.text(long=r.random() < 0.05)
            for _ in range(r.randint(0, 3)):
                a.participant_attributes[self.text()] = self.text()
        elif kind == 2:
            u = m.update_worker
            if r.random() < 0.8:
                u.status = r.choice([0, 1, 5, -2])  # type: ignore[assignment]
            u.load = r.choice([0.0, 0.5, 1.0, -1.0, 1e30, float("nan"), float("inf")])
            u.job_count = r.randint(0, 2**31)
            u.draining = r.random() < 0.1
            u.seq = r.choice([0, 1, r.randint(0, 2**63)])
        elif kind == 3:
            m.update_job.job_id = self.job_id(known)
            m.update_job.status = r.choice([0, 1, 2, 3, 4, 9, -1])  # type: ignore[assignment]
            m.update_job.error = self.text(long=r.random() < 0.05)
        elif kind == 4:
            m.ping.timestamp = r.randint(-(2**63), 2**63 - 1)
        elif kind == 5:
            m.migrate_job.job_ids.extend(self.job_id(known) for _ in range(r.randint(0, 4)))
        elif kind == 6:
            m.simulate_job.type = r.choice([0, 1, 5])  # type: ignore[assignment]
        return m

    def mutate(self, data: bytes) -> bytes:
        r = self.rng
        if not data:
            return bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
        kind = r.randrange(6)
        if kind == 0:  # truncated
            return data[: r.randrange(len(data))]
        if kind == 1:  # bit flips
            b = bytearray(data)
            for _ in range(r.randint(1, 4)):
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
            return bytes(b)
        if kind == 2:  # spliced garbage
            i = r.randrange(len(data) + 1)
            return data[:i] + bytes(r.randrange(256) for _ in range(r.randint(1, 8))) + data[i:]
        if kind == 3:  # doubled (two messages merged: repeated oneof fields)
            return data + data
        if kind == 4:  # a length prefix that lies
            return data[:1] + b"\xff\xff\xff\xff\x0f" + data[1:]
        return bytes(r.randrange(256) for _ in range(r.randint(0, 512)))

    def nested(self) -> bytes:
        """Deep nesting: start-group tags, or length-delimited fields inside each other."""
        depth = self.rng.choice((50, 120, 1000, 20000))
        if self.rng.random() < 0.5:
            return b"\x0b" * depth
        inner = b""
        for _ in range(min(depth, 2000)):
            inner = b"\x0a" + _varint(len(inner)) + inner
        return inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# -- the run -------------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, inputs: int, seed: int, workdir: Path, bystander_every: int = 2000) -> None:
        self.target = inputs
        self.seed = seed
        self.workdir = workdir
        self.bystander_every = bystander_every
        self.secret = f"fuzz-secret-{secrets.token_hex(32)}"
        self.report = FuzzReport()
        self.server = ServerProcess(free_port(), {KEY: self.secret}, workdir / "fuzz-server.log")
        self.known_jobs: list[str] = []
        self.rooms = [f"pool-{i}" for i in range(ROOM_POOL)] + [
            "pool-ñ☎通話",
            "p" * 256,
        ]
        self._tokens: dict[str, str] = {}
        self._next_bystander = bystander_every
        self._warm_at = int(inputs * WARM_UP_SHARE)
        self._bystander_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    def token(self, room_name: str = "") -> str:
        if room_name not in self._tokens:
            grants = api.VideoGrants(
                room_create=True, room_list=True, room_admin=True, room=room_name
            )
            self._tokens[room_name] = api.AccessToken(KEY, self.secret).with_grants(grants).to_jwt()
        return self._tokens[room_name]

    def count(self, n: int = 1) -> bool:
        """Count `n` inputs; False once the budget is spent."""
        if self.report.inputs >= self.target:
            return False
        self.report.inputs += n
        if not self.report.rss_warm_mb and self.report.inputs >= self._warm_at:
            self.report.rss_warm_mb = memory(self.server.pid)[0] / 2**20
        return True

    # -- /agent ----------------------------------------------------------------------------

    async def agent_lane(self, lane: int) -> None:
        gen = Gen(random.Random(self.seed * 1000 + lane))
        while self.report.inputs < self.target:
            try:
                async with asyncio.timeout(SESSION_TIMEOUT_S):
                    await self.agent_session(gen)
            except TimeoutError:
                self.report.problems.append("an /agent session hung (no answer, no close)")
            await self.maybe_bystander()

    async def agent_session(self, gen: Gen) -> None:
        r = gen.rng
        kind = r.choices(
            ["garbage", "mutated", "sequence", "worker", "huge", "text", "nested", "token"],
            weights=[10, 20, 30, 15, 1, 3, 3, 3],
        )[0]
        self.report.sessions[kind] += 1
        if not self.count():
            return
        self.report.agent_handshakes += 1
        token = agent_token(KEY, self.secret)
        if kind == "token":
            token = r.choice([token[:-3] + "abc", "garbage", token.replace(".", "", 1), ""])
        url = f"{self.server.url}/agent"
        try:
            ws = await self.http.ws_connect(
                url, headers={"Authorization": f"Bearer {token}"}, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as e:
            if kind != "token" or e.status != 401:
                self.report.problems.append(f"/agent handshake ({kind}) got HTTP {e.status}")
            return
        if kind == "token":
            self.report.problems.append("/agent accepted a bad token")
        try:
            await self.agent_frames(ws, gen, kind)
            await self.probe(ws, kind)
        finally:
            await ws.close()

    async def agent_frames(self, ws: aiohttp.ClientWebSocketResponse, gen: Gen, kind: str) -> None:
        r = gen.rng
        frames: list[bytes | str] = []
        if kind in ("sequence", "worker", "mutated") and r.random() < 0.7:
            reg = agent.WorkerMessage()
            reg.register.type = agent.JT_ROOM
            reg.register.agent_name = "fuzz" if kind == "worker" else gen.text()
            frames.append(reg.SerializeToString())
        n = r.randint(1, 6)
        if kind == "garbage":
            frames += [gen.mutate(b"") if r.random() < 0.3 else gen.mutate(b"x") for _ in range(n)]
        elif kind == "mutated":
            frames += [gen.mutate(gen.worker_message(self.known_jobs).SerializeToString())]
        elif kind in ("sequence", "worker"):
            frames += [gen.worker_message(self.known_jobs).SerializeToString() for _ in range(n)]
        elif kind == "huge":
            size = r.choice((FRAME_LIMIT - 64, FRAME_LIMIT + 1, 2 * FRAME_LIMIT))
            msg = agent.WorkerMessage()
            msg.update_job.job_id = "AJ_huge"
            msg.update_job.error = "e" * size
            frames.append(msg.SerializeToString()[: size + 16])
        elif kind == "text":
            frames.append(gen.text())
        elif kind == "nested":
            frames.append(gen.nested())
        for frame in frames:
            if ws.closed or not self.count():
                return
            self.report.agent_frames += 1
            try:
                if isinstance(frame, str):
                    await ws.send_str(frame)
                else:
                    await ws.send_bytes(frame)
            except ConnectionError:
                return
            if kind == "worker":
                await self.answer_offers(ws, gen)

    async def answer_offers(self, ws: aiohttp.ClientWebSocketResponse, gen: Gen) -> None:
        """A worker that answers the offers it got so far, badly: twice, for other ids, with
        statuses for jobs it does not run."""
        r = gen.rng
        while True:
            try:
                frame = await ws.receive(timeout=0.01)
            except TimeoutError:
                return
            if frame.type != aiohttp.WSMsgType.BINARY:
                return
            msg = agent.ServerMessage.FromString(frame.data)
            which = msg.WhichOneof("message")
            job_id = ""
            if which == "availability":
                job_id = msg.availability.job.id
            elif which == "assignment":
                job_id = msg.assignment.job.id
            if not job_id:
                continue
            self.known_jobs.append(job_id)
            del self.known_jobs[:-200]
            for _ in range(r.randint(1, 3)):
                out = agent.WorkerMessage()
                if which == "availability" and r.random() < 0.6:
                    out.availability.job_id = job_id
                    out.availability.available = r.random() < 0.8
                else:
                    out.update_job.job_id = job_id
                    out.update_job.status = r.choice([1, 2, 3, 4, 0])  # type: ignore[assignment]
                if not self.count():
                    return
                self.report.agent_frames += 1
                with contextlib.suppress(ConnectionError):
                    await ws.send_bytes(out.SerializeToString())

    async def probe(self, ws: aiohttp.ClientWebSocketResponse, kind: str) -> None:
        """The connection answers a ping, or the server closed it with a reason."""
        stamp = time.time_ns()
        with contextlib.suppress(ConnectionError):
            ping = agent.WorkerMessage(ping=agent.WorkerPing(timestamp=stamp))
            await ws.send_bytes(ping.SerializeToString())
        while True:
            frame = await ws.receive()
            if frame.type == aiohttp.WSMsgType.BINARY:
                msg = agent.ServerMessage.FromString(frame.data)
                if msg.WhichOneof("message") == "pong" and msg.pong.last_timestamp == stamp:
                    return
            elif frame.type == aiohttp.WSMsgType.CLOSE:
                code = int(frame.data)
                self.report.closes[code] += 1
                if code not in CLOSE_CODES or (code != 1009 and not frame.extra):
                    self.report.problems.append(f"{kind}: closed {code} {frame.extra!r}")
                return
            elif frame.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                self.report.closes[ws.close_code or 0] += 1
                return
            else:
                self.report.problems.append(f"{kind}: unexpected frame {frame.type!r}")
                return

    # -- Twirp -----------------------------------------------------------------------------

    async def twirp_lane(self, lane: int) -> None:
        gen = Gen(random.Random(self.seed * 1000 + 500 + lane))
        while self.count():
            await self.twirp_request(gen)
            await self.maybe_bystander()

    def twirp_body(self, gen: Gen, route: str, as_json: bool) -> tuple[bytes, str]:
        """A body for `route` and the room it names (for the token)."""
        r = gen.rng
        req = REQUEST_TYPES.get(route, room.CreateRoomRequest)()
        room_name = r.choice(self.rooms) if r.random() < 0.8 else gen.text()
        fields = {f.name for f in req.DESCRIPTOR.fields}
        if "room" in fields:
            req.room = room_name
        if "name" in fields:
            req.name = room_name
        if "agent_name" in fields:
            req.agent_name = r.choice(["fuzz", "", gen.text()])
        if "metadata" in fields:
            req.metadata = gen.text(long=r.random() < 0.05)
        if "dispatch_id" in fields:
            req.dispatch_id = r.choice(["", "AD_" + secrets.token_urlsafe(9)[:12], gen.text()])
        if "names" in fields:
            req.names.extend(gen.text() for _ in range(r.randint(0, 3)))
        if "agents" in fields and r.random() < 0.3:
            req.agents.add(agent_name="fuzz", metadata=gen.text())
        if as_json:
            from google.protobuf import json_format

            body = json_format.MessageToJson(req).encode()
        else:
            body = req.SerializeToString()
        roll = r.random()
        if roll < 0.15:
            body = gen.mutate(body)
        elif roll < 0.2:
            body = body[: r.randrange(len(body) + 1)]
        elif roll < 0.205:
            body = b"{" + b" " * (FRAME_LIMIT + 10) + b"}"
        elif roll < 0.22 and as_json:
            body = json.dumps({"name": [1, {"a": None}], "room": 5, "agents": "x"}).encode()
        return body, room_name

    async def raw_request(self, gen: Gen) -> None:
        """Malformed HTTP on a raw connection: a broken chunked body, a body shorter than its
        Content-Length, a header line over the limit, not HTTP at all."""
        r = gen.rng
        route = r.choice(ROUTES)
        token = self.token(r.choice(self.rooms))
        head = (
            f"POST /twirp/{route} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/protobuf\r\n"
        )
        kind = r.randrange(5)
        if kind == 0:
            raw = head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        elif kind == 1:
            raw = head + "Content-Length: 100\r\n\r\n" + "x" * r.randint(0, 99)
        elif kind == 2:
            raw = head + "X-Long: " + "y" * 9000 + "\r\n\r\n"
        elif kind == 3:
            raw = head + "Transfer-Encoding: chunked\r\n\r\n5\r\nabc"
        else:
            raw = "".join(r.choice(UNICODE + "GET /\r\n") for _ in range(r.randint(1, 200)))
        self.report.raw_requests += 1
        self.report.sessions[f"raw-{kind}"] += 1
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(raw.encode())
            await writer.drain()
            if kind in (1, 3):
                writer.write_eof()
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(2.0):
                    answer = await reader.read(65536)
                    status = answer.split(b" ", 2)[1:2]
                    if status and status[0].startswith(b"5"):
                        self.report.problems.append(f"raw request {kind} answered {answer[:120]!r}")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def twirp_request(self, gen: Gen) -> None:
        r = gen.rng
        if r.random() < 0.02:
            await self.raw_request(gen)
            return
        route = r.choice(ROUTES) if r.random() < 0.95 else r.choice(["x/y", "livekit.Nope/A"])
        as_json = r.random() < 0.5
        body, room_name = self.twirp_body(gen, route, as_json)
        token_kind = r.random()
        if token_kind < 0.75:
            token: str | None = self.token(room_name)
        elif token_kind < 0.85:
            token = self.token(r.choice(self.rooms))
        elif token_kind < 0.95:
            token = None
        else:
            token = r.choice(["garbage", "a.b.c", "eyJ.eyJ.x", "Bearer x", "é".encode().hex()])
        headers = {"Content-Type": "application/json" if as_json else "application/protobuf"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.report.twirp_requests += 1
        url = f"{self.server.http_url}/twirp/{route}"
        async with self.http.post(url, data=body, headers=headers) as resp:
            payload = await resp.read()
        self.report.twirp_statuses[resp.status] += 1
        if resp.status >= 500:
            self.report.problems.append(f"Twirp {route} answered {resp.status}: {payload[:200]!r}")
        elif resp.status != 200:
            with contextlib.suppress(ValueError):
                error = json.loads(payload)
                if not isinstance(error, dict) or not error.get("code") or not error.get("msg"):
                    self.report.problems.append(f"Twirp {route}: not a Twirp error {payload!r}")
        if resp.status == 200 and route in (ROUTES[0], ROUTES[4]):
            if room_name not in self.rooms:
                await self.delete_room(room_name)
            elif r.random() < 0.2:
                await self.delete_room(r.choice(self.rooms))

    async def delete_room(self, name: str) -> None:
        """Delete a room the fuzz created, so that what the server holds stays bounded and its
        memory shows leaks rather than data (a valid DeleteRoom, itself an input)."""
        if not self.count():
            return
        self.report.twirp_requests += 1
        with contextlib.suppress(Exception):
            await Twirp(self.http, self.server.http_url).call(
                "livekit.RoomService/DeleteRoom",
                room.DeleteRoomRequest(room=name),
                room.DeleteRoomResponse,
                self.token(name),
            )
        if name not in self.rooms:
            self._tokens.pop(name, None)

    # -- the bystander ---------------------------------------------------------------------

    async def maybe_bystander(self) -> None:
        if self.report.inputs < self._next_bystander or self._bystander_lock.locked():
            return
        async with self._bystander_lock:
            self._next_bystander += self.bystander_every
            await self.bystander_job()

    async def bystander_job(self) -> None:
        """A dispatch for the bystander must reach it and end JS_SUCCESS."""
        n = self.report.bystander_jobs
        name = f"bystander-room-{n}"
        twirp = Twirp(self.http, self.server.http_url)
        done_before = len(self.bystander.finished)
        try:
            async with asyncio.timeout(BYSTANDER_DEADLINE_S):
                await twirp.call(
                    "livekit.AgentDispatchService/CreateDispatch",
                    agent_dispatch.CreateAgentDispatchRequest(agent_name=BYSTANDER, room=name),
                    agent_dispatch.AgentDispatch,
                    self.token(name),
                )
                while True:
                    listed = await twirp.call(
                        "livekit.AgentDispatchService/ListDispatch",
                        agent_dispatch.ListAgentDispatchRequest(room=name),
                        agent_dispatch.ListAgentDispatchResponse,
                        self.token(name),
                    )
                    states = [
                        j.state
                        for d in listed.agent_dispatches
                        if d.agent_name == BYSTANDER
                        for j in d.state.jobs
                    ]
                    if states and states[0].status == agent.JS_SUCCESS:
                        break
                    if states and states[0].status == agent.JS_FAILED:
                        raise AssertionError(f"bystander job failed: {states[0].error}")
                    await asyncio.sleep(0.02)
                await twirp.call(
                    "livekit.RoomService/DeleteRoom",
                    room.DeleteRoomRequest(room=name),
                    room.DeleteRoomResponse,
                    self.token(name),
                )
        except (TimeoutError, AssertionError) as e:
            self.report.problems.append(f"bystander job {n}: {e!r}")
        else:
            if len(self.bystander.finished) <= done_before:
                self.report.problems.append(f"bystander job {n} did not run on the bystander")
        self._tokens.pop(name, None)
        self.report.bystander_jobs += 1

    # -- the whole run ---------------------------------------------------------------------

    async def run(self) -> FuzzReport:
        started = time.monotonic()
        async with aiohttp.ClientSession() as self._http:
            await self.server.start(self.http)
            self.bystander = SimWorker(self.server.url, KEY, self.secret, agent_name=BYSTANDER)
            await self.bystander.start()
            sampler = asyncio.ensure_future(self.sample_task())
            try:
                lanes = [self.agent_lane(i) for i in range(AGENT_LANES)]
                lanes += [self.twirp_lane(i) for i in range(TWIRP_LANES)]
                await asyncio.gather(*lanes)
                await self.bystander_job()
                self.report.rss_end_mb = memory(self.server.pid)[0] / 2**20
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                await self.bystander.aclose()
                if not self.server.running:
                    self.report.problems.append("the server process died")
                self.report.server_exit = await self.server.stop()
        self.report.wall_s = time.monotonic() - started
        self.check_log()
        return self.report

    async def sample_task(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                rss = memory(self.server.pid)[0] / 2**20
                self.report.rss_peak_mb = max(self.report.rss_peak_mb, rss)
            await asyncio.sleep(0.5)

    def check_log(self) -> None:
        if self.report.server_exit != 0:
            self.report.problems.append(f"server exited {self.report.server_exit} on SIGTERM")
        for rec in json_lines(self.server.log_path):
            if rec.get("level") in ("ERROR", "CRITICAL"):
                self.report.problems.append(f"server logged: {json.dumps(rec)[:300]}")
        for line in non_json_lines(self.server.log_path):
            self.report.problems.append(f"server printed: {line[:300]}")
        if self.report.rss_growth_mb > MAX_RSS_GROWTH_MB:
            self.report.problems.append(
                f"server memory grew {self.report.rss_growth_mb:.1f} MB after the warm-up "
                f"(limit {MAX_RSS_GROWTH_MB:g} MB)"
            )


async def run_fuzz(
    inputs: int, seed: int, workdir: Path, bystander_every: int = 2000
) -> FuzzReport:
    return await Fuzzer(inputs, seed, workdir, bystander_every).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--keep", type=Path, help="keep the server log in this directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="callboard-fuzz-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run_fuzz(args.inputs, args.seed, workdir))
    summary = report.summary()
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    for problem in report.problems[:50]:
        print("PROBLEM", problem, file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
