"""A LiveKit cluster built from real parts on one machine: a Redis, N livekit-server nodes in
multi-node mode sharing it (each on its own loopback ports), and a TCP front per worker.

`running_cluster()` starts and stops it all by PID; what the nodes say (which worker registered
where, where a room was placed) is read from their JSON logs, the server's own account.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tests.cluster.front import Fronts
from tests.interop.livekit_server import ServerProcess, start_livekit_node, stop_process
from tests.server.sip.redis_server import running_redis

NODE_STOP_GRACE_S: Final = 15.0


@dataclass(eq=False)
class Node:
    """One livekit-server of the cluster and what its log says."""

    index: int
    server: ServerProcess

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def running(self) -> bool:
        return self.server.proc.poll() is None

    def log_records(self, msg: str) -> list[dict[str, Any]]:
        """Every JSON log line of this node whose message is `msg`, oldest first."""
        try:
            lines = self.server.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            if f'"{msg}"' not in line:
                continue
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("msg") == msg:
                    out.append(rec)
        return out

    def registered_workers(self) -> set[str]:
        return {str(r.get("workerID")) for r in self.log_records("worker registered")}

    def node_id(self) -> str:
        started = self.log_records("starting LiveKit server")
        return str(started[0].get("nodeID", "")) if started else ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop this node: SIGTERM (livekit-server's graceful stop) or SIGKILL."""
        if self.running:
            os.kill(self.server.proc.pid, sig)
        stop_process(self.server.proc, NODE_STOP_GRACE_S)


@dataclass
class Cluster:
    redis_address: str
    nodes: list[Node]
    fronts: Fronts
    log_dir: Path
    _stopped: list[Node] = field(default_factory=list)

    def front_for(self, home: int) -> str:
        """A ws:// URL that reaches node `home`, or the next running node when it is gone."""
        order = [self.nodes[(home + k) % len(self.nodes)].port for k in range(len(self.nodes))]
        return f"ws://127.0.0.1:{self.fronts.open(order)}"

    def node_of(self, worker_id: str) -> Node | None:
        """The node whose log says `worker_id` registered there."""
        return next((n for n in self.nodes if worker_id in n.registered_workers()), None)

    def room_node(self, room: str) -> Node | None:
        """The node livekit-server placed `room` on ("selected node for room" in any log)."""
        by_id = {n.node_id(): n for n in self.nodes}
        for n in self.nodes:
            for rec in n.log_records("selected node for room"):
                if rec.get("room") == room:
                    return by_id.get(str(rec.get("selectedNodeID")))
        return None

    def log_tails(self, limit: int = 1500) -> str:
        return "\n".join(
            f"--- node {n.index} log tail ---\n{n.server.log_tail(limit)}" for n in self.nodes
        )


@contextlib.contextmanager
def running_cluster(log_dir: Path, nodes: int) -> Iterator[Cluster]:
    """Redis, then `nodes` livekit-server nodes on it; everything stopped on exit, by PID.

    Raises RedisUnavailable / ServerUnavailable when redis-server / Go are missing."""
    with running_redis(log_dir / "redis") as redis_address:
        started: list[Node] = []
        fronts: Fronts | None = None
        try:
            for i in range(nodes):
                started.append(Node(i, start_livekit_node(log_dir, f"node{i}", redis_address)))
            fronts = Fronts()
            yield Cluster(redis_address, started, fronts, log_dir)
        finally:
            if fronts is not None:
                fronts.close()
            for node in started:
                stop_process(node.server.proc, NODE_STOP_GRACE_S)
