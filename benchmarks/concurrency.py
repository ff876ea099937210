"""Several clients at once: aggregate tokens/s, time to first token and per-token latency of
`edgespec serve --parallel N` against llama.cpp's own `llama-server --parallel 4` (issue 20).

Servers, each on the default target, 2 threads, all started first; they are then measured in turn,
level by level (the order rotating from one level to the next), so that the VM's drift between
minutes falls on every server alike. A server waits idle, its model loaded, while another runs:
- `edgespec-p1`: `edgespec serve` as before issue 20 (one request at a time), `--profile auto`;
- `edgespec-p4`: `--parallel 4`, `--profile auto` (llama.cpp's kernels: the distribution guarantee);
- `edgespec-p4-exact`: `--parallel 4 --kernels exact` (`--profile auto`);
- `llama-server-p4`: llama.cpp's server built from the sources llama-cpp-python 0.3.36 vendors,
  `--parallel 4`, its defaults otherwise (no speculation), the same threads and context per slot,
  without its prompt cache in RAM (`--cache-ram 0`).

Every request says `cache_prompt: false`: each server evaluates every prompt whole, as edgespec's
`--no-cache-prompt` does (the same prompts are sent at every level).

For each level of concurrency (1, 2, 4, 8 clients) and each server, the same `--requests` chat
requests (the first turns of Spec-Bench, greedy, `--max-tokens` each, streamed) are sent by that
many threads at once, each with its own official `openai` client. Measured per level: wall time,
aggregate completion tokens/s (all tokens over the wall time), time to first token (send to the
first content chunk) and per-token latency ((last chunk - first chunk) / (tokens - 1)), p50 and
p95 over the requests.

Exactness: the 1-client level of each server is its "served alone" answer. Under `--kernels exact`
every answer at 2, 4 and 8 clients must be identical to it; the script exits 1 otherwise. For the
other servers it reports how many answers differ (llama.cpp's kernels round differently per batch
shape, so a near-tie may break otherwise beside other requests).

    python benchmarks/concurrency.py --llama-server /tmp/llserver/bin/llama-server \\
        --out benchmarks/results/concurrency.json
    python benchmarks/concurrency.py --short 200 --max-tokens 96 --llama-server ... \\
        --out benchmarks/results/concurrency-short.json
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_QUESTIONS, ROOT, machine, spec_bench_prompts, stop, write_json  # noqa: E402

LEVELS = (1, 2, 4, 8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(command: list[str], ready: str, url: str, log: Path) -> Iterator[str]:
    """Run a server until the block ends; `ready` is a regex its output prints once it listens."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        try:
            deadline = time.monotonic() + 900
            while not re.search(ready, log.read_text()):
                if proc.poll() is not None:
                    tail = log.read_text()[-2000:]
                    raise SystemExit(f"{command[0]} exited with {proc.returncode}:\n{tail}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{command[0]} did not start within 15 minutes")
                time.sleep(0.5)
            yield url
        finally:
            stop(proc)


def ask(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=900)
    start = time.perf_counter()
    first = last = None
    text, n = "", 0
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        # Every prompt is evaluated whole by every server: llama-server would otherwise take a
        # prompt it saw at an earlier level from a slot's cache (its log: "n_past was set to 60"
        # for a 61-token prompt), skipping the prompt processing the others do.
        extra_body={"cache_prompt": False},
    )
    for chunk in stream:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text += chunk.choices[0].delta.content
    assert first is not None and last is not None, "no content came"
    return {
        "text": text,
        "tokens": n,
        "ttft": first - start,
        "per_token": (last - first) / max(n - 1, 1),
    }


def short_prompts(chars: int, n: int, least: int = 0) -> list[str]:
    """`n` Spec-Bench first turns of `least` to `chars` characters, one category after another."""
    from edgespec.bench.datasets import read_prompts

    by_category: dict[str, list[str]] = {}
    for p in read_prompts(BENCH_QUESTIONS):
        if least <= len(p.prompt) <= chars:
            by_category.setdefault(p.category, []).append(p.prompt)
    out: list[str] = []
    while len(out) < n and any(by_category.values()):
        for texts in by_category.values():
            if texts and len(out) < n:
                out.append(texts.pop(0))
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_level(url: str, prompts: list[str], max_tokens: int, clients: int) -> dict[str, Any]:
    """Send every prompt, `clients` at a time; the level's figures (and the answers, as "texts")."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: ask(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    tokens = sum(a["tokens"] for a in answers)
    return {
        "clients": clients,
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50": round(pct([a["ttft"] for a in answers], 0.5), 3),
        "ttft_p95": round(pct([a["ttft"] for a in answers], 0.95), 3),
        "per_token_p50": round(pct([a["per_token"] for a in answers], 0.5), 4),
        "per_token_p95": round(pct([a["per_token"] for a in answers], 0.95), 4),
        "texts": [a["text"] for a in answers],
    }


def save(args: argparse.Namespace, prompts: list[str], results: dict[str, Any]) -> None:
    write_json(
        args.out,
        {
            "machine": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "prompt_chars": [len(p) for p in prompts],
            "results": results,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server binary (peer)")
    parser.add_argument("--only", action="append", default=None, help="run only these servers")
    parser.add_argument(
        "--levels", type=int, nargs="+", default=list(LEVELS), help="clients at once (the first: 'alone')"
    )
    parser.add_argument(
        "--short",
        type=int,
        default=None,
        metavar="CHARS",
        help="only prompts of at most CHARS characters, one per category in turn (decoding then "
        "dominates, not prompt processing)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec.load import models

    target = models.resolve(models.TARGET)
    if args.short is None:
        prompts = [p["prompt"] for p in spec_bench_prompts(1, 13)][: args.requests]
    else:
        prompts = short_prompts(args.short, args.requests)
    common = ["--target", str(target), "--threads", str(args.threads), "--ctx", str(args.ctx)]
    common += ["--no-cache-prompt", "--max-queue", "64"]
    edgespec = [sys.executable, "-m", "edgespec", "serve", "--host", "127.0.0.1"]
    configs: dict[str, tuple[list[str], str]] = {
        "edgespec-p1": ([*edgespec, *common, "--parallel", "1"], r"serving .* on http"),
        "edgespec-p4": ([*edgespec, *common, "--parallel", "4"], r"serving .* on http"),
        "edgespec-p4-exact": (
            [*edgespec, *common, "--parallel", "4", "--kernels", "exact"],
            r"serving .* on http",
        ),
    }
    if args.llama_server is not None:
        peer = [str(args.llama_server), "-m", str(target), "--parallel", "4", "-c", str(args.ctx * 4)]
        peer += ["-t", str(args.threads), "-tb", str(args.threads), "--host", "127.0.0.1", "--no-webui"]
        peer += ["--cache-ram", "0"]  # no prompt cache in RAM either (see `ask`)
        configs["llama-server-p4"] = (peer, r"listening on http")
    chosen = {name: config for name, config in configs.items() if not args.only or name in args.only}
    results: dict[str, Any] = {name: [] for name in chosen}
    logs = ROOT / "bench-out"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        urls = {}
        for name, (command, ready) in chosen.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = logs / f"concurrency-{name}.log"
            urls[name] = stack.enter_context(server([*command, "--port", str(port)], ready, url, log))
            ask(urls[name], "Hi", 4)  # warm-up, not counted
        names = list(chosen)
        for turn, clients in enumerate(args.levels):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                level = run_level(urls[name], prompts, args.max_tokens, clients)
                results[name].append(level)
                print(f"{name}, {clients} clients: {level['tokens_per_s']:.2f} tokens/s", flush=True)
    failed = False
    for name, levels in results.items():
        alone = levels[0]["texts"]
        for level in levels:
            level["differ_from_alone"] = sum(t != a for t, a in zip(level.pop("texts"), alone, strict=True))
        failed = failed or ("exact" in name and any(level["differ_from_alone"] for level in levels))
    if args.out is not None:
        save(args, prompts, results)
    print("| server | clients | tokens/s | TTFT p50 / p95 s | per token p50 / p95 ms | differ from alone |")
    print("|---|---|---|---|---|---|")
    for name, levels in results.items():
        for lv in levels:
            print(
                f"| {name} | {lv['clients']} | {lv['tokens_per_s']:.2f} | "
                f"{lv['ttft_p50']:.2f} / {lv['ttft_p95']:.2f} | "
                f"{lv['per_token_p50'] * 1000:.0f} / {lv['per_token_p95'] * 1000:.0f} | "
                f"{lv['differ_from_alone']}/{len(prompts)} |"
            )
    base = {lv["clients"]: lv["tokens_per_s"] for lv in results.get("edgespec-p1", [])}
    for name, levels in results.items():
        gains = [f"{lv['clients']}: {lv['tokens_per_s'] / base[lv['clients']]:.2f}x" for lv in levels if base]
        if gains:
            print(f"{name} vs edgespec-p1: {', '.join(gains)}")
    if failed:
        raise SystemExit("an answer under --kernels exact differed from the one served alone")


if __name__ == "__main__":
    main()
