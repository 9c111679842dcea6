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


async def test_a_write_to_a_gone_peer_makes_the_next_read_a_hang_up() -> None:
    """Found by the soak: a job process told its outcome to a worker that had just died; the
    broken pipe surfaced in its next read as a traceback instead of a hang-up."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    theirs.close()
    writer.write(ipc.encode(ipc.Pong(time.time(), time.time())))
    await asyncio.sleep(0)  # the transport reports the broken pipe to the reader
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
