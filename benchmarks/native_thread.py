"""Which thread calls llama_decode: one step of the default target from the first thread that
decoded and from another one, with edgespec's CPU thread and without it; and a target with its
draft model on one thread or on two.

llama.cpp's CPU backend runs each graph in an OpenMP parallel region; libgomp keeps a team for
every thread that has started one, and once the teams' threads outnumber the CPUs it makes every
barrier sleep instead of spin (`edgespec.runtimes.native`). Loading checks the model's logits from
the loading thread, so before each runtime had a thread of its own, a server's worker (or the
leader of a shared pass) decoded beside the loading thread's idle team.

One `Engine(target, "none")` (llama.cpp's kernels, flash attention off, 2 threads). Per rep, in
each mode, a 64-token greedy chat from the main thread (which loaded the model) and then from a
new thread; the figure is the median time of one verification step (`t_verify / n_steps`):
- `own thread`: as edgespec runs now, every llama_decode on the CPU thread;
- `caller's thread`: that thread bypassed, llama_decode called from whichever thread generates,
  as before.

--pair one|two instead runs `Engine(draft_max=3)` (the default pair, the model drafting 3 tokens)
for 3 greedy 64-token chats and reports tokens/s: `one` as edgespec runs now (target and draft
model on the one CPU thread), `two` with a thread for each (as commit 4f4233d had it). Each is a
process of its own: run them in turn, alternating.

    python benchmarks/native_thread.py --out benchmarks/results/native_thread.json
    python benchmarks/native_thread.py --pair two --out benchmarks/results/native_pair_two.json
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_run  # noqa: E402
from concurrency import short_prompts  # noqa: E402


def step_ms(engine: Any, prompt: str, in_thread: bool) -> float:
    def run() -> float:
        r = engine.chat([{"role": "user", "content": prompt}], max_tokens=64, temperature=0)
        return 1000 * r.stats.t_verify / r.stats.n_steps

    if not in_thread:
        return run()
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(run()))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pair", choices=("one", "two"), default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import edgespec
    from edgespec.load import models

    if args.pair is not None:
        pair(args)
        return

    prompt = short_prompts(200, 2)[1]
    rows = []
    with edgespec.Engine(
        models.resolve(models.TARGET),
        "none",
        threads=args.threads,
        n_ctx=1024,
        flash_attn="off",
        cache_prompt=False,
    ) as engine:
        runtime = engine._pair.engine.target
        native = runtime._native
        own_call = native.call
        for rep in range(args.reps):
            for mode in ("own thread", "caller's thread"):
                native.call = own_call if mode == "own thread" else (lambda fn, *a: fn(*a))
                for where, in_thread in (("main thread", False), ("another thread", True)):
                    ms = step_ms(engine, prompt, in_thread)
                    rows.append({"rep": rep, "mode": mode, "caller": where, "step_ms": ms})
                    print(f"rep {rep} {mode:15} from the {where:14}: {ms:.1f} ms a step", flush=True)
        native.call = own_call
    summary = [
        {
            "mode": mode,
            "caller": where,
            "step_ms": median([r["step_ms"] for r in rows if r["mode"] == mode and r["caller"] == where]),
        }
        for mode in ("own thread", "caller's thread")
        for where in ("main thread", "another thread")
    ]
    print("\n| llama_decode on | generating from | ms a step (median) |\n|---|---|---|")
    for s in summary:
        print(f"| {s['mode']} | {s['caller']} | {s['step_ms']:.1f} |")
    write_run(args.out, args, rows=rows, summary=summary)


def pair(args: argparse.Namespace) -> None:
    import edgespec
    import edgespec.runtimes.llama_cpp as lc
    from edgespec.load import models
    from edgespec.runtimes.native import NativeThread

    if args.pair == "two":  # a thread of its own for every context, as commit 4f4233d had it
        lc._native_threads.for_layers = lambda gpu_layers: (NativeThread("edgespec-native"), True)
    prompt = short_prompts(200, 2)[1]
    rates = []
    with edgespec.Engine(
        models.resolve(models.TARGET),
        draft_max=3,
        threads=args.threads,
        n_ctx=1024,
        flash_attn="off",
        cache_prompt=False,
    ) as engine:
        for _ in range(args.reps):
            r = engine.chat([{"role": "user", "content": prompt}], max_tokens=64, temperature=0)
            rates.append(r.stats.tokens_per_second)
    print(f"pair on {args.pair} thread(s): {', '.join(f'{x:.2f}' for x in rates)} tokens/s", flush=True)
    write_run(args.out, args, tokens_per_s=rates)


if __name__ == "__main__":
    main()
