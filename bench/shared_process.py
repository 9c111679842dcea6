"""Where a job process's memory goes as calls are added to it (`jobs_per_process`).

One callboard worker runs examples/receptionist.py with `--jobs-per-process` (default 8) against
livekit-server in a private network namespace (root, Linux; nothing leaves the machine). After
one untimed call it samples the idle tree, then for each count in `--calls` (default 1 3 6) it
places that many calls at once (bench/voice.py's memory sample: callers in their own
processes, silent after the greeting) and, once every caller heard its greeting, prints the
tree's added PSS per call, each process's PSS/USS/threads, and the busiest job process's
private memory by kind of mapping (heap, pymalloc-sized anonymous regions, other anonymous
regions, thread stacks, mapped files). It also compares that process's pages with its parent's
(the zygote it was forked from, /proc/<pid>/pagemap): still the zygote's page, a private copy
of one (copy-on-write; and of those, how many still hold the zygote's very bytes: written and
written back, as Python 3.11 does to the reference count of every object it merely uses), or
new. Not side by side: see bench/voice.py for the comparison with livekit-agents; this says
what the shared process holds.

    sudo python -m bench.shared_process [--jobs-per-process 8] [--calls 1 3 6]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Final

import psutil
from livekit import api

from bench._side_by_side import AgentProcess, TreeMemory, settle
from bench.voice import ConversationBench, wait_registered
from tests.interop.livekit_server import API_KEY, API_SECRET, start_server, stop_process
from tests.interop.netns import MEDIA_IP, enter_private_network

KB: Final = 1024
PYMALLOC_SIZES_KB: Final = range(1000, 1101)
"""Anonymous regions of about 1 MiB: CPython's object arenas."""
STACK_SIZES_KB: Final = range(8180, 8201)
"""Anonymous regions of about 8 MiB: thread stacks."""
PAGE: Final = os.sysconf("SC_PAGE_SIZE")
PAGEMAP_ENTRY: Final = 8
PAGE_PRESENT: Final = 1 << 63
PAGE_FRAME: Final = (1 << 55) - 1
"""The page frame number bits of a pagemap entry (zero unless root)."""


def private_by_kind(pid: int) -> dict[str, float]:
    """MB of private (dirty or clean) memory of `pid` by kind of anonymous mapping, and by
    file for mapped files, largest first (under 0.1 MB left out)."""
    kinds: dict[str, float] = {}
    kind = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                kind = _kind(*_mapping(parts))
            elif parts[0] in ("Private_Dirty:", "Private_Clean:") and kind:
                kinds[kind] = kinds.get(kind, 0.0) + int(parts[1]) / KB
    return {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.1}


def _mapping(parts: list[str]) -> tuple[int, int, str]:
    """The start, end and name (or "") of a mapping line of /proc/<pid>/maps or smaps, split."""
    start, end = (int(x, 16) for x in parts[0].split("-"))
    return start, end, parts[5] if len(parts) > 5 else ""


def _kind(start: int, end: int, name: str) -> str:
    size_kb = (end - start) // KB
    if name == "[heap]":
        return "heap"
    if name:
        return os.path.basename(name) if name.startswith("/") else ""
    if size_kb in PYMALLOC_SIZES_KB:
        return "pymalloc arenas"
    if size_kb in STACK_SIZES_KB:
        return "thread stacks"
    return "other anonymous"


@dataclass
class PageOrigins:
    """A process's resident pages, against its parent's at the same addresses."""

    shared: int = 0
    """The parent's very page."""
    copied: int = 0
    """A private copy of a page the parent has (copy-on-write)."""
    copied_unchanged: int = 0
    """Copies whose bytes still equal the parent's page: written, then written back."""
    new: int = 0
    """No page at that address in the parent (fresh memory, or a file it never mapped)."""


def page_origins(pid: int, parent: int) -> dict[str, PageOrigins]:
    """`pid`'s resident pages by kind of mapping, each compared with `parent`'s (root only)."""
    by_kind: dict[str, PageOrigins] = collections.defaultdict(PageOrigins)
    files = [f"/proc/{p}/{f}" for f in ("pagemap", "mem") for p in (pid, parent)]
    with contextlib.ExitStack() as stack:
        maps, parent_maps, mem, parent_mem = (
            stack.enter_context(open(f, "rb", buffering=0)) for f in files
        )
        for start, end, name in _mappings(pid):
            kind = _kind(start, end, name)
            if not kind:
                continue
            origins = by_kind[kind]
            own_pages, their_pages = _pagemap(maps, start, end), _pagemap(parent_maps, start, end)
            pages = zip(own_pages, their_pages, strict=True)
            for i, (own, theirs) in enumerate(pages):
                if not own & PAGE_PRESENT:
                    continue
                if not theirs & PAGE_PRESENT:
                    origins.new += 1
                elif (own ^ theirs) & PAGE_FRAME == 0:
                    origins.shared += 1
                else:
                    origins.copied += 1
                    address = start + i * PAGE
                    own_bytes = _page(mem, address)
                    if own_bytes is not None and own_bytes == _page(parent_mem, address):
                        origins.copied_unchanged += 1
    return by_kind


def _mappings(pid: int) -> list[tuple[int, int, str]]:
    with open(f"/proc/{pid}/maps") as maps:
        return [_mapping(line.split()) for line in maps]


def _pagemap(f: BinaryIO, start: int, end: int) -> memoryview:
    f.seek(start // PAGE * PAGEMAP_ENTRY)
    return memoryview(f.read((end - start) // PAGE * PAGEMAP_ENTRY)).cast("Q")


def _page(f: BinaryIO, address: int) -> bytes | None:
    try:
        f.seek(address)
        return f.read(PAGE)
    except OSError:
        return None


def describe_origins(pid: int, parent: int) -> None:
    by_kind = page_origins(pid, parent)

    def mb(pages: int) -> str:
        return f"{pages * PAGE / KB / KB:.1f}"

    counts = (sum(getattr(o, f.name) for o in by_kind.values()) for f in fields(PageOrigins))
    total = PageOrigins(*counts)
    print(
        f"  pid {pid} against its parent {parent} (MB): still shared {mb(total.shared)}, "
        f"copied {mb(total.copied)} (of which {mb(total.copied_unchanged)} hold the parent's "
        f"bytes again), new {mb(total.new)}"
    )
    copied = sorted(by_kind.items(), key=lambda kv: -kv[1].copied)
    print(
        "    copied by mapping (MB, of which unchanged): "
        + ", ".join(f"{k} {mb(o.copied)} ({mb(o.copied_unchanged)})" for k, o in copied[:5])
    )


def describe(worker: AgentProcess, idle: TreeMemory, calls: int) -> None:
    tree = worker.memory()
    print(f"{calls} call(s): added PSS per call {(tree.pss_mb - idle.pss_mb) / calls:.1f} MB")
    rows = []
    for p in worker.tree():
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            rows.append((p.pid, info.pss / KB / KB, info.uss / KB / KB, p.num_threads()))
    for pid, pss, uss, threads in rows:
        print(f"  pid {pid}: PSS {pss:.1f} MB, USS {uss:.1f} MB, {threads} threads")
    busiest = max(rows, key=lambda r: r[3])[0]
    print(f"  pid {busiest} private memory by mapping (MB): {private_by_kind(busiest)}")
    with contextlib.suppress(psutil.Error, OSError):
        describe_origins(busiest, psutil.Process(busiest).ppid())


async def run(jobs_per_process: int, counts: list[int]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    server: Any = await asyncio.to_thread(start_server, "livekit-server", workdir, MEDIA_IP)
    try:
        bench = ConversationBench(server, workdir, 1, max(counts), 1)
        async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
            worker = AgentProcess(
                "ours",
                "start",
                server,
                "shared",
                workdir,
                script="voice_agent",
                extra_env={"BENCH_EXAMPLE": str(bench.examples["ours"])},
                args=("--jobs-per-process", str(jobs_per_process)),
            )
            try:
                await bench.callers.start()
                await wait_registered(worker)
                await bench.conversations(lk, worker, 1)  # untimed
                await settle(worker)
                idle = worker.memory()
                print(f"idle tree: {idle}")
                for n in counts:
                    _, busy = await bench.conversations(
                        lk, worker, n, measure=True, at_sample=lambda n=n: describe(worker, idle, n)
                    )
                    if busy is None:
                        print(f"{n} call(s): not sampled, a caller heard no greeting")
                    await settle(worker)
            finally:
                await asyncio.to_thread(worker.stop)
                await bench.callers.aclose()
    finally:
        stop_process(server.proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shared_process", description=__doc__)
    p.add_argument("--jobs-per-process", type=int, default=8, help="calls a process (8)")
    p.add_argument("--calls", type=int, nargs="+", default=[1, 3, 6], help="counts (1 3 6)")
    p.add_argument("--timeout", type=float, default=900.0, help="overall limit, s (900)")
    a = p.parse_args(argv)
    if a.jobs_per_process < 1 or min(a.calls) < 1:
        p.error("--jobs-per-process and --calls must be at least 1")
    with contextlib.suppress(KeyError):
        del os.environ["LIVEKIT_URL"]
    enter_private_network()
    asyncio.run(asyncio.wait_for(run(a.jobs_per_process, a.calls), a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
