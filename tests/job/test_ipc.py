"""The job process's channel to the worker: how a read ends when the worker goes away."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from callboard.job import ipc


async def test_a_peer_that_closes_with_our_frames_unread_is_a_hang_up() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    writer.write(ipc.encode(ipc.Pong(time.time(), time.time())))
    await writer.drain()
    theirs.close()  # unread data: the kernel resets the connection
    assert await ipc.read_message(reader) is None
    writer.close()


async def test_a_frame_cut_short_is_an_error_not_a_hang_up() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    theirs.sendall(ipc.encode(ipc.Ping(time.time()))[:-2])
    theirs.close()
    with pytest.raises(ipc.IpcError, match="truncated IPC frame body"):
        await ipc.read_message(reader)
    writer.close()
