"""An agent with a shared inference runner (a separate module: importing it registers the
runner, which makes every worker of this module start an inference process)."""

from __future__ import annotations

import os

from callboard import JobContext
from callboard.job.inference import InferenceRunner

RESULTS_ENV = "CALLBOARD_TEST_INFERENCE_OUT"


class ReverseRunner(InferenceRunner):
    """Reverses bytes and says which process did it."""

    INFERENCE_METHOD = "reverse"

    def initialize(self) -> None:
        self.pid = os.getpid()

    def run(self, data: bytes) -> bytes | None:
        return data[::-1] + b"|" + str(self.pid).encode()


InferenceRunner.register_runner(ReverseRunner)


async def uses_inference(ctx: JobContext) -> None:
    result = await ctx.inference_executor.do_inference("reverse", b"abc")
    with open(os.environ[RESULTS_ENV], "a") as f:  # noqa: ASYNC230 (tiny test write)
        f.write(f"{os.getpid()} {result.decode()}\n")
