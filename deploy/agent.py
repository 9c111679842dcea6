"""The agent the image runs by default: answers each call, greets, and holds the line until the
caller leaves. Replace it with yours (build argument AGENT); only its import differs from a
livekit-agents agent."""

from __future__ import annotations

from callboard import JobContext, WorkerOptions, cli


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.wait_for_participant()


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
