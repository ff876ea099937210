"""A bounded soak test of `edgespec serve`: many requests from concurrent clients on loopback.
Nothing may fail, memory must stay flat, and every answer must be the one its request gets alone.

    python benchmarks/soak.py --requests 200 --clients 8 --out benchmarks/results/soak.json
    python benchmarks/soak.py -- --target T.gguf --draft D.gguf --ctx 4096   (real models)

Without engine flags the server runs the tiny test pair (tests/tinymodels.py, built in a temporary
folder) on one thread with a 1024-token context. In turn:
1. `python -m edgespec serve --port 0 --no-cache-prompt --max-queue 2xCLIENTS FLAGS` starts. The
   queue holds two requests per client: a client that leaves a stream sends its next request
   before the server has seen it go, and should not be refused for it.
2. References: each distinct request of the plan, sent alone, one after another.
3. Warm-up: 2 requests per client, all clients at once (not counted). RSS of the server process.
4. Load: `--requests` requests from `--clients` threads at once, each thread with its own official
   `openai` client, each taking the next request of the plan as soon as its last one is answered.
   The plan mixes chat and completions, streamed and not, six prompts, max_tokens from 8 to 64,
   stop strings, greedy decoding and some seeded sampling (deterministic too). Every
   `--abandon-every`th request is a stream its client closes after the first chunk: the server
   must cancel it and go on; it is counted apart and not compared.
5. RSS at the end (and its peak, sampled during the load); /health; Ctrl-C; the exit status and
   the server's standard error.

Why --no-cache-prompt: with prefix reuse the cached part of a prompt was computed in another batch
shape, and llama.cpp's kernels round differently per batch shape, so at a near-tie a greedy answer
can depend on which request came before (`GenerationSettings.cache_prompt`). Concurrent clients
change that order from run to run: the comparison would measure that known effect, not the
server. Evaluated whole, an answer depends on its request alone, so any difference is a server
bug (answers crossed between clients, state left behind by a cancelled stream).

Criteria (exit 1 if any fails): no request fails (errors are counted by HTTP status; no 5xx, and
no other error either: every request is valid and the queue has room for all); every answer identical to
its reference (text and finish reason); RSS growth from after the warm-up to the end under
`--max-growth` (10%); the server exits with 130 on Ctrl-C and writes no traceback or error line.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, stop, write_json  # noqa: E402

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a KV cache is in two sentences.",
    "the cat sat on the mat and",
    "List three uses of a hash map.",
    "once upon a time there was a little dog who",
    "Add type hints to this function:\n\ndef area(w, h):\n    return w * h\n",
]
STOPS: list[list[str] | None] = [None, None, ["\n\n"], [" the", "."]]
MAX_TOKENS = [8, 16, 32, 64]
MiB = 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """One distinct request: what its answer depends on (streaming or not must not matter)."""

    chat: bool
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] | None
    temperature: float
    seed: int | None


@dataclass(frozen=True)
class Planned:
    spec: int  # index into the specs
    stream: bool
    abandon: bool  # a stream its client closes after the first chunk


def make_specs(n: int = 24) -> list[Spec]:
    """`n` distinct requests: every fifth samples at temperature 0.8 with a seed, the rest greedy."""
    specs = []
    for i in range(n):
        stop = STOPS[i % len(STOPS)]
        sampled = i % 5 == 4
        specs.append(
            Spec(
                chat=i % 2 == 0,
                prompt=PROMPTS[i % len(PROMPTS)],
                max_tokens=MAX_TOKENS[(i // 2) % len(MAX_TOKENS)],
                stop=tuple(stop) if stop else None,
                temperature=0.8 if sampled else 0.0,
                seed=1000 + i if sampled else None,
            )
        )
    return specs


def make_plan(requests: int, n_specs: int, abandon_every: int, seed: int = 8) -> list[Planned]:
    rng = random.Random(seed)
    plan = []
    for i in range(requests):
        abandon = abandon_every > 0 and i % abandon_every == abandon_every - 1
        plan.append(Planned(rng.randrange(n_specs), stream=abandon or rng.random() < 0.5, abandon=abandon))
    return plan


# -- the server ----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    stderr: list[str]


@contextmanager
def serve(flags: list[str], env: dict[str, str] | None = None) -> Iterator[Server]:
    """`python -m edgespec serve --port 0 --no-cache-prompt FLAGS`, until Ctrl-C at the end of the
    block; `Server.stderr` holds its standard error lines (all of them once the block has ended)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgespec", "serve", "--port", "0", "--no-cache-prompt", *flags],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    stderr: list[str] = []

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            stderr.append(line)
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while True:
            try:
                line = lines.get(timeout=600)
            except queue.Empty:
                raise SystemExit("edgespec serve did not start within 10 minutes") from None
            found = re.match(r"serving .* on (http://\S+)/v1 ", line)
            if found:
                break
            if proc.poll() is not None:
                raise SystemExit(f"edgespec serve exited with {proc.returncode}: {''.join(stderr)}")
        yield Server(found.group(1), proc, stderr)
    finally:
        stop(proc)
        reader.join(10)


def tiny_flags(directory: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from tests.tinymodels import build_pair

    target, draft = build_pair(directory)
    return ["--target", str(target), "--draft", str(draft), "--threads", "1", "--ctx", "1024"]


# -- the clients ---------------------------------------------------------------------------------


def ask(client: Any, spec: Spec, stream: bool, abandon: bool = False) -> dict[str, Any]:
    """Send one request; returns status ("ok", "abandoned", or the HTTP status / error name of a
    failure), text, finish reason and latency."""
    import openai

    extra: dict[str, Any] = {"max_tokens": spec.max_tokens, "temperature": spec.temperature}
    if spec.stop:
        extra["stop"] = list(spec.stop)
    if spec.seed is not None:
        extra["seed"] = spec.seed
    start = time.perf_counter()
    try:
        if spec.chat:
            messages = [{"role": "user", "content": spec.prompt}]
            reply = client.chat.completions.create(model="any", messages=messages, stream=stream, **extra)
        else:
            reply = client.completions.create(model="any", prompt=spec.prompt, stream=stream, **extra)
        if not stream:
            choice = reply.choices[0]
            text = choice.message.content if spec.chat else choice.text
            return record("ok", text, choice.finish_reason, start)
        parts, finish = [], None
        for chunk in reply:
            if abandon:
                reply.close()  # leave after the first chunk, the generation under way
                return record("abandoned", None, None, start)
            for choice in chunk.choices:
                parts.append((choice.delta.content if spec.chat else choice.text) or "")
                finish = choice.finish_reason or finish
        return record("ok", "".join(parts), finish, start)
    except openai.APIStatusError as exc:
        return record(str(exc.status_code), None, None, start)
    except openai.APIError as exc:
        return record(type(exc).__name__, None, None, start)


def record(status: str, text: str | None, finish: str | None, start: float) -> dict[str, Any]:
    return {"status": status, "text": text, "finish_reason": finish, "latency_s": time.perf_counter() - start}


def run_concurrently(url: str, specs: list[Spec], plan: list[Planned], clients: int) -> list[dict]:
    """The plan's requests from `clients` threads at once, each with its own client; results in
    plan order."""
    import openai

    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(plan)):
        todo.put(i)
    results: list[dict] = [{} for _ in plan]

    def work() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            item = plan[i]
            results[i] = {"spec": item.spec, "stream": item.stream}
            results[i] |= ask(client, specs[item.spec], item.stream, item.abandon)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class RssSampler:
    """The peak resident memory of a process, sampled every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def now(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def health(url: str) -> dict[str, Any]:
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=10) as reply:
        return json.loads(reply.read())


# -- the soak ------------------------------------------------------------------------------------


def soak(
    flags: list[str],
    requests: int,
    clients: int,
    abandon_every: int = 10,
    max_growth: float = 0.10,
    n_specs: int = 24,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the whole soak against a server started with `flags`; returns the summary (with
    `failures`, empty when every criterion holds) and the per-request records."""
    import openai

    specs = make_specs(n_specs)
    plan = make_plan(requests, n_specs, abandon_every)
    warm_plan = make_plan(2 * clients, n_specs, abandon_every, seed=9)
    with serve(["--max-queue", str(2 * clients), *flags], env) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        started = time.perf_counter()
        references = [ask(client, spec, stream=False) for spec in specs]
        reference_s = time.perf_counter() - started
        run_concurrently(server.url, specs, warm_plan, clients)
        sampler = RssSampler(server.proc.pid)
        rss_warm = sampler.now()
        started = time.perf_counter()
        with sampler:
            results = run_concurrently(server.url, specs, plan, clients)
        wall_s = time.perf_counter() - started
        time.sleep(0.5)  # let the last cancellations land
        rss_end = sampler.now()
        counters = health(server.url)
    exit_code = server.proc.returncode
    stderr = "".join(server.stderr)

    statuses = Counter(r["status"] for r in results)
    errors = {status: n for status, n in statuses.items() if status not in ("ok", "abandoned")}
    answered = [r for r in results if r["status"] == "ok"]
    for r in answered:
        ref = references[r["spec"]]
        r["identical"] = (r["text"], r["finish_reason"]) == (ref["text"], ref["finish_reason"])
    identical = sum(r["identical"] for r in answered)
    growth = (rss_end - rss_warm) / rss_warm
    bad_lines = [line.strip() for line in server.stderr if re.search(r"Traceback|ERROR|Exception", line)]
    failures = []
    if bad_ref := [r["status"] for r in references if r["status"] != "ok"]:
        failures.append(f"reference requests failed: {bad_ref}")
    if errors:
        failures.append(f"requests failed: {errors}")
    if identical != len(answered):
        failures.append(f"{len(answered) - identical} of {len(answered)} answers differ from their reference")
    if growth >= max_growth:
        failures.append(f"RSS grew {growth:.1%} (limit {max_growth:.0%})")
    if exit_code != 130:
        failures.append(f"the server exited with {exit_code}, not 130, on Ctrl-C")
    if bad_lines:
        failures.append(f"the server's standard error has {len(bad_lines)} error lines: {bad_lines[:3]}")
    summary = {
        "requests": requests,
        "clients": clients,
        "distinct_requests": n_specs,
        "streamed": sum(p.stream for p in plan),
        "chat": sum(specs[p.spec].chat for p in plan),
        "sampled_with_seed": sum(specs[p.spec].temperature > 0 for p in plan),
        "answered": len(answered),
        "abandoned": statuses.get("abandoned", 0),
        "errors_by_status": errors,
        "identical_to_alone": identical,
        "rss_after_warmup_mib": rss_warm / MiB,
        "rss_end_mib": rss_end / MiB,
        "rss_peak_mib": sampler.peak / MiB,
        "rss_growth": growth,
        "max_growth": max_growth,
        "wall_s": wall_s,
        "requests_per_s": requests / wall_s,
        "median_latency_s": sorted(r["latency_s"] for r in answered)[len(answered) // 2]
        if answered
        else None,
        "reference_s": reference_s,
        "server_health": counters,
        "server_exit_code": exit_code,
        "server_stderr_error_lines": len(bad_lines),
        "failures": failures,
    }
    return {
        "summary": summary,
        "results": [{k: v for k, v in r.items() if k != "text"} for r in results],
        "stderr": stderr,
    }


def table(summary: dict[str, Any]) -> list[str]:
    s = summary
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_status"].items())) or "none"
    return [
        "| measure | value |",
        "|---|---|",
        f"| requests | {s['requests']} ({s['answered']} answered, {s['abandoned']} streams left mid-way "
        "on purpose) |",
        f"| concurrent clients | {s['clients']} |",
        f"| mix | {s['chat']} chat / {s['requests'] - s['chat']} completions, {s['streamed']} streamed, "
        f"{s['sampled_with_seed']} sampled with a seed, {s['distinct_requests']} distinct requests |",
        f"| errors by status | {errors} |",
        f"| answers identical to the request served alone | {s['identical_to_alone']} of {s['answered']} |",
        f"| server RSS after warm-up | {s['rss_after_warmup_mib']:.1f} MiB |",
        f"| server RSS at the end (peak) | {s['rss_end_mib']:.1f} MiB ({s['rss_peak_mib']:.1f} MiB) |",
        f"| RSS growth | {s['rss_growth']:+.2%} (limit {s['max_growth']:.0%}) |",
        f"| wall time of the load | {s['wall_s']:.1f} s ({s['requests_per_s']:.1f} requests/s, median "
        f"latency {s['median_latency_s']:.3f} s) |",
        f"| server exit on Ctrl-C, error lines on stderr | {s['server_exit_code']}, "
        f"{s['server_stderr_error_lines']} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--abandon-every", type=int, default=10, help="0: no stream is left mid-way")
    parser.add_argument("--max-growth", type=float, default=0.10, help="RSS growth allowed (0.10: 10%%)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parallel", type=int, default=1, help="edgespec serve --parallel")
    parser.add_argument("flags", nargs="*", help="engine flags for edgespec serve (after --)")
    args = parser.parse_args()

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        flags = [*(args.flags or tiny_flags(Path(tmp))), "--parallel", str(args.parallel)]
        outcome = soak(flags, args.requests, args.clients, args.abandon_every, args.max_growth)
    summary = outcome["summary"]
    rows = table(summary)
    print("\n".join(rows))
    for failure in summary["failures"]:
        print(f"FAIL: {failure}", file=sys.stderr)
    if args.out:
        write_json(
            args.out,
            {
                "machine": info,
                "flags": args.flags or "tiny test pair, --threads 1 --ctx 1024",
                "parallel": args.parallel,
                "summary": summary,
                "table": rows,
                "results": outcome["results"],
            },
        )
    if summary["failures"]:
        raise SystemExit(1)
    print("\nall criteria hold")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
