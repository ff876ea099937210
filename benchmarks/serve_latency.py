"""Time to first token and tokens/s: `edgespec serve` (the official `openai` client, streaming
chat) against the same requests through `edgespec run`, on the same models and flags.

    python benchmarks/serve_latency.py --max-tokens 128 --repeats 3 \
        --out benchmarks/results/serve_latency.json [-- ENGINE FLAGS, e.g. --draft none]

For each prompt and repeat, in turn:
- `edgespec run --json PROMPT`: a fresh process. Its time to first token is the engine's
  (`stats.t_prompt`: prompt evaluation up to the first token, models already loaded); the process's
  wall time (loading included) is recorded too.
- the same prompt as a streaming chat request to one `edgespec serve` started at the beginning,
  with `cache_prompt: false`, so the server evaluates the whole prompt as `run` does: time to first
  token as the client sees it (request sent → first non-empty content delta, HTTP and server-sent
  events included), the engine's own t_prompt (from the `edgespec` field of the last chunk), and
  tokens/s after the first token. Its text must equal `run`'s, or the script exits 1.
- the same request again with the server's default prefix reuse: all but the prompt's last token
  come from the cache. Its text is compared with `run`'s and the result recorded, not enforced:
  the cached keys/values were computed in another batch shape, which may break near-ties
  otherwise (see `GenerationSettings.cache_prompt`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, write_json  # noqa: E402

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a KV cache is in two sentences.",
    "Add type hints to this function:\n\ndef area(w, h):\n    return w * h\n",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def edgespec(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgespec", *args]


def run_once(prompt: str, max_tokens: int, flags: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        edgespec("run", "--json", "--max-tokens", str(max_tokens), *flags, prompt),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"edgespec run failed: {proc.stderr.strip()}")
    record = json.loads(proc.stdout)
    stats = record["stats"]
    return {
        "text": record["text"],
        "ttft_s": stats["t_prompt"],
        "tokens_per_s": stats["tokens_per_second"],
        "completion_tokens": stats["n_generated"],
        "prompt_tokens": record["prompt_tokens"],
        "process_wall_s": wall,
    }


def stream_once(client, model: str, prompt: str, max_tokens: int, cache_prompt: bool = True) -> dict:
    start = time.perf_counter()
    first = last = None
    parts: list[str] = []
    usage = extra = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"cache_prompt": cache_prompt},
    )
    for chunk in stream:
        now = time.perf_counter()
        data = chunk.to_dict()
        extra = data.get("edgespec", extra)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                first = first or now
                last = now
    if usage is None or first is None or extra is None:
        raise SystemExit("the server's stream lacked content, usage or the edgespec field")
    n = usage.completion_tokens
    return {
        "text": "".join(parts),
        "ttft_s": first - start,
        "engine_ttft_s": extra["t_prompt"],
        "tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else 0.0,
        "engine_tokens_per_s": extra["tokens_per_second"],
        "completion_tokens": n,
        "prompt_tokens": usage.prompt_tokens,
        "prompt_tokens_cached": extra["n_prompt_cached"],
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edgespec serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("edgespec serve did not become ready")


def summary(rows: list[dict], key: str) -> float:
    return median([row[key] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("flags", nargs="*", help="engine flags for both (after --)")
    args = parser.parse_args()

    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(edgespec("serve", "--port", str(port), *args.flags), stderr=subprocess.PIPE)
    try:
        t0 = time.perf_counter()
        wait_ready(url, server)
        server_start_s = time.perf_counter() - t0
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        stream_once(client, model, "Say hi.", 8)  # warm-up, not counted
        runs, cold, repeat = [], [], []
        for rep in range(args.repeats):
            for prompt in PROMPTS:
                ran = run_once(prompt, args.max_tokens, args.flags)
                served = stream_once(client, model, prompt, args.max_tokens, cache_prompt=False)
                again = stream_once(client, model, prompt, args.max_tokens)
                if served["text"] != ran["text"]:
                    print(f"MISMATCH on {prompt!r}:\n{ran['text']!r}\n{served['text']!r}", file=sys.stderr)
                    raise SystemExit(1)
                served["same_text_as_run"] = True
                again["same_text_as_run"] = again["text"] == ran["text"]
                for rows, row in ((runs, ran), (cold, served), (repeat, again)):
                    rows.append(
                        {"prompt": prompt, "repeat": rep, **{k: v for k, v in row.items() if k != "text"}}
                    )
                print(
                    f"{rep} {prompt[:30]!r}: run ttft {ran['ttft_s']:.3f}s {ran['tokens_per_s']:.1f} t/s | "
                    f"serve ttft {served['ttft_s']:.3f}s {served['tokens_per_s']:.1f} t/s | "
                    f"repeat ttft {again['ttft_s']:.3f}s",
                    file=sys.stderr,
                )
    finally:
        server.terminate()
        server.wait(30)

    table = [
        "| path | time to first token (median) | engine's own | tokens/s (median) | prompt tokens cached |",
        "|---|---|---|---|---|",
        f"| `edgespec run` (fresh process) | {summary(runs, 'ttft_s'):.3f} s | (same) | "
        f"{summary(runs, 'tokens_per_s'):.2f} | 0 |",
        f"| `edgespec serve`, streaming chat, whole prompt | {summary(cold, 'ttft_s'):.3f} s | "
        f"{summary(cold, 'engine_ttft_s'):.3f} s | {summary(cold, 'tokens_per_s'):.2f} | "
        f"{summary(cold, 'prompt_tokens_cached'):.0f} |",
        f"| `edgespec serve`, same request again, prefix reused | {summary(repeat, 'ttft_s'):.3f} s | "
        f"{summary(repeat, 'engine_ttft_s'):.3f} s | {summary(repeat, 'tokens_per_s'):.2f} | "
        f"{summary(repeat, 'prompt_tokens_cached'):.0f} |",
    ]
    print("\n".join(table))
    same = sum(row["same_text_as_run"] for row in repeat)
    print(f"\nprefix-reused answers identical to `edgespec run`'s: {same} of {len(repeat)}")
    wall = summary(runs, "process_wall_s")
    print(f"\n`edgespec run` process wall time (load included), median {wall:.2f} s")
    print(f"`edgespec serve` start to ready: {server_start_s:.2f} s")
    if args.out:
        write_json(
            args.out,
            {
                "machine": machine(),
                "flags": args.flags,
                "max_tokens": args.max_tokens,
                "server_start_s": server_start_s,
                "run": runs,
                "serve_cold": cold,
                "serve_repeat": repeat,
                "table": table,
            },
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
