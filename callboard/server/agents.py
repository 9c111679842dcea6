"""The `/agent` WebSocket endpoint: authenticates workers, runs their sessions.

Each connection must present a token with the `agent` grant, send `register` first (within the
register timeout), then speaks `WorkerMessage`/`ServerMessage` protobuf in binary frames. A bad
frame closes that one connection with a reason; the rest of the server is unaffected.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import DecodeError
from livekit.protocol import agent, models

from callboard.log import get_logger
from callboard.server.auth import AuthError, Grants, KeyStore
from callboard.server.config import MAX_AGENT_FRAME_BYTES, ServerConfig
from callboard.server.dispatch import DispatchEngine
from callboard.server.ids import WORKER_PREFIX, new_id
from callboard.server.workers import WorkerSession
from callboard.version import __version__

log = get_logger("server.agents")

AGENT_PROTOCOL: Final = 1
MAX_CLOSE_REASON: Final = 120
NO_AGENT_GRANT: Final = "no permissions to access the room: the token lacks the agent grant"
SHUTDOWN_REASON: Final = "server shutting down"
DEFAULT_PERMISSIONS: Final = models.ParticipantPermission(
    can_subscribe=True, can_publish=True, can_publish_data=True, can_update_metadata=True
)


class ProtocolViolation(Exception):
    """A frame that ends the connection; the message is the close reason sent to the peer."""

    def __init__(self, reason: str, code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        super().__init__(reason)
        self.code = code


def server_info(config: ServerConfig, node_id: str) -> models.ServerInfo:
    return models.ServerInfo(
        edition=models.ServerInfo.Standard,
        version=__version__,
        protocol=16,
        region=config.region,
        node_id=node_id,
        agent_protocol=AGENT_PROTOCOL,
    )


class AgentEndpoint:
    """aiohttp handler for `GET /agent`; one coroutine per worker connection."""

    def __init__(
        self, keys: KeyStore, engine: DispatchEngine, config: ServerConfig, info: models.ServerInfo
    ) -> None:
        self._keys = keys
        self._engine = engine
        self._config = config
        self._info = info
        self._sockets: set[web.WebSocketResponse] = set()

    async def on_shutdown(self, app: web.Application) -> None:
        """Close every worker connection (1001 going away) so shutdown does not wait on them."""
        await asyncio.gather(
            *(
                ws.close(code=WSCloseCode.GOING_AWAY, message=SHUTDOWN_REASON.encode())
                for ws in list(self._sockets)
            ),
            return_exceptions=True,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "?"
        try:
            grants = self._keys.verify_header(
                request.headers.get("Authorization"), request.query.get("access_token")
            )
        except AuthError as e:
            log.warning("agent connection refused", extra={"peer": peer, "reason": str(e)})
            return web.Response(status=401, text=str(e))
        if grants is None or not grants.has("agent"):
            reason = "missing access token" if grants is None else NO_AGENT_GRANT
            log.warning("agent connection refused", extra={"peer": peer, "reason": reason})
            return web.Response(status=401, text=reason)
        ws = web.WebSocketResponse(max_msg_size=MAX_AGENT_FRAME_BYTES, autoping=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=404, text="/agent expects a WebSocket upgrade")
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._serve(ws, grants, peer)
        finally:
            self._sockets.discard(ws)
        return ws

    async def _serve(self, ws: web.WebSocketResponse, grants: Grants, peer: str) -> None:
        session: WorkerSession | None = None
        reason = "connection closed by the worker"
        try:
            session = await self._handshake(ws, grants)
            if session is None:
                return
            self._engine.add_worker(session)
            await self._run(ws, session)
        except ProtocolViolation as e:
            reason = str(e)
            fields = session.log_fields if session else {}
            log.warning(
                "closing agent connection", extra={**fields, "peer": peer, "reason": reason}
            )
            await ws.close(code=e.code, message=reason[:MAX_CLOSE_REASON].encode())
        except ConnectionError:
            # The worker went away while we wrote to it: an ordinary disconnect, not an error
            # for aiohttp to log with a traceback.
            reason = "connection lost"
        except asyncio.CancelledError:
            reason = "connection lost"
            raise
        finally:
            if session is not None:
                self._engine.remove_worker(session, reason)

    async def _handshake(self, ws: web.WebSocketResponse, grants: Grants) -> WorkerSession | None:
        deadline = time.monotonic() + self._config.register_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolViolation(
                    f"no register message within {self._config.register_timeout:g}s"
                )
            try:
                msg = await self._receive(ws, timeout=remaining)
            except TimeoutError:
                continue
            if msg is None:
                return None
            which = msg.WhichOneof("message")
            if which == "ping":
                await self._pong(ws, msg.ping)
            elif which == "register":
                return await self._register(ws, grants, msg.register)
            else:
                raise ProtocolViolation(f"expected register as the first message, got {which}")

    async def _register(
        self, ws: web.WebSocketResponse, grants: Grants, req: agent.RegisterWorkerRequest
    ) -> WorkerSession:
        if req.type not in agent.JobType.values():
            raise ProtocolViolation(f"unknown job type {req.type} in register")
        perms = models.ParticipantPermission()
        perms.CopyFrom(
            req.allowed_permissions if req.HasField("allowed_permissions") else DEFAULT_PERMISSIONS
        )
        # Agent tokens name the sources; an unknown one would fail every assignment later.
        unknown = [s for s in perms.can_publish_sources if s not in models.TrackSource.values()]
        if unknown:
            raise ProtocolViolation(
                f"unknown track source {unknown[0]} in register allowed_permissions"
            )
        worker_id = new_id(WORKER_PREFIX)

        async def send(msg: agent.ServerMessage) -> None:
            if ws.closed:
                raise ConnectionResetError("worker connection is closed")
            await ws.send_bytes(msg.SerializeToString())

        session = WorkerSession(
            id=worker_id,
            api_key=grants.api_key,
            agent_name=req.agent_name,
            namespace=req.namespace,
            job_type=req.type,
            version=req.version,
            permissions=perms,
            send=send,
        )
        await send(
            agent.ServerMessage(
                register=agent.RegisterWorkerResponse(worker_id=worker_id, server_info=self._info)
            )
        )
        return session

    async def _run(self, ws: web.WebSocketResponse, session: WorkerSession) -> None:
        engine = self._engine
        while True:
            msg = await self._receive(ws)
            if msg is None:
                return
            which = msg.WhichOneof("message")
            if which == "availability":
                engine.on_availability(session, msg.availability)
            elif which == "update_job":
                engine.on_update_job(session, msg.update_job)
            elif which == "update_worker":
                self._update_worker(session, msg.update_worker)
            elif which == "ping":
                await self._pong(ws, msg.ping)
            elif which == "migrate_job":
                await engine.on_migrate(session, msg.migrate_job)
            elif which == "simulate_job":
                log.warning(
                    "simulate_job is not supported by callboard server, ignored",
                    extra=session.log_fields,
                )
            elif which == "register":
                raise ProtocolViolation("register sent twice on one connection")
            else:
                raise ProtocolViolation("empty or unknown WorkerMessage")

    def _update_worker(self, session: WorkerSession, update: agent.UpdateWorkerStatus) -> None:
        before = (session.status, session.draining)
        if session.update_status(update) and before != (session.status, session.draining):
            log.info(
                "worker status changed",
                extra={
                    **session.log_fields,
                    "status": agent.WorkerStatus.Name(session.status)
                    if session.status in agent.WorkerStatus.values()
                    else session.status,
                    "load": round(session.load, 3),
                    "job_count": session.job_count,
                    "draining": session.draining,
                },
            )

    @staticmethod
    async def _pong(ws: web.WebSocketResponse, ping: agent.WorkerPing) -> None:
        pong = agent.WorkerPong(last_timestamp=ping.timestamp, timestamp=int(time.time() * 1000))
        await ws.send_bytes(agent.ServerMessage(pong=pong).SerializeToString())

    @staticmethod
    async def _receive(
        ws: web.WebSocketResponse, timeout: float | None = None
    ) -> agent.WorkerMessage | None:
        """The next WorkerMessage; None when the peer closed. Bad frames raise ProtocolViolation."""
        frame = await ws.receive(timeout=timeout)
        if frame.type == WSMsgType.BINARY:
            msg = agent.WorkerMessage()
            try:
                msg.ParseFromString(frame.data)
            except DecodeError:
                raise ProtocolViolation(
                    "malformed WorkerMessage: not a valid protobuf", WSCloseCode.UNSUPPORTED_DATA
                ) from None
            return msg
        if frame.type == WSMsgType.TEXT:
            raise ProtocolViolation(
                "text frames are not supported: send binary protobuf WorkerMessage frames",
                WSCloseCode.UNSUPPORTED_DATA,
            )
        if frame.type == WSMsgType.ERROR:
            raise ProtocolViolation(f"bad frame: {frame.data}", WSCloseCode.MESSAGE_TOO_BIG)
        return None
