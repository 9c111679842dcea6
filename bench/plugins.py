"""The offline voice plugins: STT latency per utterance, TTS time to first audio, and memory of
the models shared by a worker's jobs versus loaded in each job.

    python -m bench.plugins                # 3 rounds of 4 utterances, 4 jobs side by side
    python -m bench.plugins --rounds 10 --jobs 8

Latency runs in this process, with the models in-process and then through livekit-agents' own
inference process (`InferenceProcExecutor`, as its worker starts it). Memory: `--jobs` job
processes that import the plugins and load a VAD, plus one inference process holding Whisper and
hibari (ours), side by side with `--jobs` processes that each load the models themselves (what
a plugin without inference runners costs); PSS summed over each set.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import psutil
from livekit import rtc
from livekit.agents import tokenize, tts
from livekit.agents.testing import fake_job_context

from bench._common import machine_summary, percentile
from callboard.plugins.local import EspeakTTS, HibariTTS, WhisperSTT, load_vad, models
from callboard.plugins.local.runners import inference_process

UTTERANCES = (
    "Hello, I would like to book an appointment for tomorrow morning.",
    "My name is Alice Johnson.",
    "Can you come in on Tuesday afternoon?",
    "That's all, thank you very much, goodbye.",
)
REPLY = "Thanks for calling Acme Dental. How can I help you today? We are open until six."
MB = 2**20


def _ms(values: Sequence[float]) -> str:
    p50, p95 = (percentile(sorted(values), q) * 1000 for q in (50, 95))
    return f"p50 {p50:6.0f} ms  p95 {p95:6.0f} ms"


async def _speak(engine: tts.TTS, text: str) -> rtc.AudioFrame:
    return rtc.combine_audio_frames([ev.frame async for ev in engine.synthesize(text)])


async def stt_latencies(rounds: int) -> tuple[list[float], float]:
    """Seconds per utterance (room audio, 48 kHz), and the audio seconds per round."""
    voice, stt = HibariTTS(), WhisperSTT()
    audio = [await _speak(voice, text) for text in UTTERANCES]
    await stt.recognize(audio[0])  # warm-up
    latencies = []
    for _ in range(rounds):
        for frame in audio:
            started = time.perf_counter()
            await stt.recognize(frame)
            latencies.append(time.perf_counter() - started)
    return latencies, sum(f.duration for f in audio)


async def first_audio_latencies(engine: tts.TTS, rounds: int) -> list[float]:
    """Seconds from the first sentence's last word pushed to its first audio frame, streamed
    through livekit-agents' sentence StreamAdapter as an AgentSession does."""
    adapter = tts.StreamAdapter(
        tts=engine, sentence_tokenizer=tokenize.blingfire.SentenceTokenizer()
    )
    latencies = []
    for _ in range(rounds + 1):
        async with adapter.stream() as stream:
            started = time.perf_counter()
            stream.push_text(REPLY)
            await anext(stream)
            latencies.append(time.perf_counter() - started)
            stream.end_input()
            async for _ in stream:
                pass
    return latencies[1:]


def pss(pid: int) -> float:
    return float(psutil.Process(pid).memory_full_info().pss)


def child_main(mode: str) -> None:
    """A job process: plugins imported, a VAD loaded, models loaded here when `mode` is local."""
    load_vad()
    if mode == "local":
        models.whisper().transcribe(bytes(32000), "en")
        models.hibari_voice().synthesize("Warm up.", 1.0)
    print("ready", flush=True)
    sys.stdin.read()


def jobs_pss(mode: str, count: int) -> float:
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.plugins", "--child", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"job process {child.pid} failed to start")
        return sum(pss(child.pid) for child in children)
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)


async def run(rounds: int, jobs: int) -> None:
    print(f"bench.plugins on {machine_summary()}")
    stt_local, audio_seconds = await stt_latencies(rounds)
    print(
        f"STT per utterance, in-process:        {_ms(stt_local)}  "
        f"(RTF {statistics.mean(stt_local) * len(UTTERANCES) / audio_seconds:.2f})"
    )
    async with inference_process() as executor:
        assert executor.pid is not None
        shared_pss = pss(executor.pid)
        with fake_job_context(inference_executor=executor):
            stt_shared, _ = await stt_latencies(rounds)
            hibari_shared = await first_audio_latencies(HibariTTS(), rounds)
    hibari_local = await first_audio_latencies(HibariTTS(), rounds)
    print(f"STT per utterance, inference process: {_ms(stt_shared)}")
    print(f"TTS first audio, hibari in-process:   {_ms(hibari_local)}")
    print(f"TTS first audio, hibari inf. process: {_ms(hibari_shared)}")
    if EspeakTTS.available():
        espeak = await first_audio_latencies(EspeakTTS(), rounds)
        print(f"TTS first audio, espeak-ng:           {_ms(espeak)}")

    shared_jobs, local_jobs = jobs_pss("shared", jobs), jobs_pss("local", jobs)
    ours = shared_pss + shared_jobs
    print(f"inference process with Whisper tiny.en + hibari: {shared_pss / MB:.0f} MB PSS")
    print(
        f"a job process: {shared_jobs / jobs / MB:.0f} MB PSS with the models shared, "
        f"{local_jobs / jobs / MB:.0f} MB with the models in the job"
    )
    print(
        f"{jobs} jobs, models shared (ours): {ours / MB:.0f} MB PSS; "
        f"models in each job: {local_jobs / MB:.0f} MB PSS; ratio {ours / local_jobs:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the utterances (3)")
    parser.add_argument("--jobs", type=int, default=4, help="job processes per side (4)")
    parser.add_argument("--child", choices=["shared", "local"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    asyncio.run(asyncio.wait_for(run(args.rounds, args.jobs), timeout=900))


if __name__ == "__main__":
    main()
