"""Entry of a job (or inference) process started with the `spawn` start method:
`python -m callboard.job.spawned <fd> [--inference]`, launched by the zygote.

It reads the ZygoteConfig from its socket, imports the agent itself, then runs exactly what a
forked child runs. Slower to start than a fork, for libraries that cannot survive one.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

from callboard.job import ipc
from callboard.job.child import EXIT_CRASHED, ChildSpec, after_fork, child_main
from callboard.job.inference import inference_main
from callboard.job.zygote import SPAWNED_INFERENCE_FLAG, load_agent


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    config = ipc.recv_stream_blocking(sock)
    if not isinstance(config, ipc.ZygoteConfig):
        print("callboard spawned process: expected a ZygoteConfig first", file=sys.stderr)
        return EXIT_CRASHED
    zygote_pid = os.getppid()
    try:
        entry, prewarm = load_agent(config)
    except BaseException:
        traceback.print_exc()
        return EXIT_CRASHED
    if SPAWNED_INFERENCE_FLAG in argv[2:]:
        sock.close()
        after_fork(set())
        return inference_main(zygote_pid)
    after_fork({sock.fileno()})
    spec = ChildSpec(entry, prewarm, config.log_level, config.shutdown_timeout, zygote_pid)
    return child_main(sock, spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
