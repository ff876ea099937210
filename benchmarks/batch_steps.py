"""Where the time of continuous batching goes: the passes themselves, or the work between them?

Issue 20's server measurements left a gap: at 4 clients each stream got a token every ~314 ms, while
`batch_cost.py` timed a bare 4-row pass at ~239 ms. This separates the two in one process, without
HTTP. One `edgespec.Engine(parallel=4)` per kernel setting (target only, so every step is one row
per sequence); for N = 1, 2 and 4 streams at once (N threads, each streaming a different Spec-Bench
first turn, greedy, --max-tokens tokens), within the window in which all N are decoding:

- aggregate tokens/s, and its ratio to N = 1 (what `--parallel` buys over one at a time);
- the batcher's passes (`BatchStats.history`): their median time, the share of the window they
  fill, and the median gap between one pass's end and the next one's start (each generation's
  own Python work: sampling, streaming, the next call);
- a bare pass of the same shape (`eval_many`, N sequences of one row, at the sequences' positions,
  rolled back after), timed right after in the same context: the pass's own cost.

Runs are interleaved (each rep: every N under each setting); nothing else may run meanwhile. The
settings (--configs): `fast` (llama.cpp's kernels, flash attention off, as llama-cpp-python runs
them), `fast-fa` (the same with flash attention on, as llama-server's "auto" runs them on a CPU),
`exact` (the exact kernels, which run flash attention as the invariance probe measured them).
--prompt-chars picks longer Spec-Bench prompts (the window then starts at a later position).

--layout measures instead how the choice of sequences lays a pass out: with one KV stream per
sequence llama.cpp puts only consecutive sequence ids in one ubatch, so a bare pass of one row
each for sequences {0, 1} is timed against {0, 2}, and {0, 1, 2} against {0, 1, 3}, interleaved.

    python benchmarks/batch_steps.py --threads 2 --out benchmarks/results/batch_steps.json
    python benchmarks/batch_steps.py --configs fast,fast-fa --out benchmarks/results/batch_steps_fa.json
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_run  # noqa: E402
from concurrency import short_prompts  # noqa: E402

STREAMS = (1, 2, 4)
CONFIGS = {  # Engine options of each setting
    "fast": {"kernels": "fast", "flash_attn": "off"},
    "fast-fa": {"kernels": "fast", "flash_attn": "on"},
    "exact": {"kernels": "exact"},
}


def run_streams(engine: Any, prompts: list[str], max_tokens: int, **options: Any) -> dict:
    """Stream every prompt at once, one thread each (`options` go to `Engine.stream`); the window
    in which all were decoding."""
    stamps: list[list[float]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for _ in engine.stream(
                prompts[i], max_tokens=max_tokens, temperature=0, cache_prompt=False, **options
            ):
                stamps[i].append(time.perf_counter())
        except BaseException as exc:  # reported below
            errors.append(exc)

    batcher = engine._slots.target
    before = len(batcher.stats.history)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    start = max(s[0] for s in stamps)  # every stream has its first token
    end = min(s[-1] for s in stamps)  # no stream has finished yet
    tokens = sum(sum(start < t <= end for t in s) for s in stamps)
    passes = [
        p for p in list(batcher.stats.history)[before:] if p.start >= start and p.start + p.seconds <= end
    ]
    gaps = [b.start - (a.start + a.seconds) for a, b in zip(passes, passes[1:], strict=False)]
    full = [p.seconds for p in passes if p.seqs == len(prompts)]
    return {
        "window_s": end - start,
        "tokens": tokens,
        "tokens_per_s": tokens / (end - start) if end > start else float("nan"),
        "passes": len(passes),
        "full_passes": len(full),
        "pass_ms": 1000 * median(full),
        "in_passes": sum(p.seconds for p in passes) / (end - start) if end > start else float("nan"),
        "gap_ms": 1000 * median(gaps),
        "bare_ms": 1000 * bare_pass(engine, len(prompts)),
    }


def bare_pass(engine: Any, n: int, reps: int = 5) -> float:
    """Median time of one `eval_many` of n one-row sequences, at positions 64…, rolled back."""
    runtime = engine._slots.target.runtime
    times = []
    for _ in range(reps):
        held = [len(runtime.seq_tokens(s)) for s in range(n)]
        t0 = time.perf_counter()
        runtime.eval_many([(s, [runtime.seq_tokens(s)[-1]]) for s in range(n)], "all")
        times.append(time.perf_counter() - t0)
        for s in range(n):
            runtime.truncate_seq(s, held[s])
    return median(times)


LAYOUTS = ((0, 1), (0, 2), (0, 1, 2), (0, 1, 3))


def layouts(engine: Any, reps: int) -> list[dict]:
    """Median bare-pass time of each set of sequences in LAYOUTS (one row each), interleaved."""
    runtime = engine._slots.target.runtime
    for seq in range(4):  # each sequence after a prompt of its own length
        runtime.truncate_seq(seq, 0)
        runtime.eval(list(range(1000 + seq, 1080 + 10 * seq)), "last", seq=seq)
    times: dict[tuple[int, ...], list[float]] = {ids: [] for ids in LAYOUTS}
    for _ in range(reps):
        for ids in LAYOUTS:
            held = [len(runtime.seq_tokens(s)) for s in ids]
            t0 = time.perf_counter()
            runtime.eval_many([(s, [5]) for s in ids], "all")
            times[ids].append(time.perf_counter() - t0)
            for s, n in zip(ids, held, strict=True):
                runtime.truncate_seq(s, n)
    return [{"sequences": list(ids), "ms": 1000 * median(t)} for ids, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--short", type=int, default=200, help="prompts of at most this many characters")
    parser.add_argument(
        "--prompt-chars",
        type=int,
        default=0,
        help="prompts of at least this many characters (and at most --short; default: any)",
    )
    parser.add_argument("--configs", default="fast,exact", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--ctx", type=int, default=1024, help="context tokens per sequence")
    parser.add_argument("--layout", action="store_true", help="time pass layouts only (see above)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import edgespec

    if args.layout:
        with edgespec.Engine(draft="none", parallel=4, threads=args.threads, n_ctx=1024) as engine:
            rows = layouts(engine, 4 * args.reps)
        for row in rows:
            print(f"sequences {row['sequences']}: {row['ms']:.1f} ms")
        write_run(args.out, args, layouts=rows)
        return

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"--configs: {', '.join(unknown) or 'none given'}; choose among {', '.join(CONFIGS)}")
    prompts = short_prompts(args.short, max(STREAMS) * args.reps, args.prompt_chars)
    if len(prompts) < max(STREAMS) * args.reps:
        parser.error(f"only {len(prompts)} Spec-Bench prompts of {args.prompt_chars}-{args.short} characters")
    engines = {
        name: edgespec.Engine(
            draft="none", parallel=max(STREAMS), threads=args.threads, n_ctx=args.ctx, **CONFIGS[name]
        )
        for name in configs
    }
    rows = []
    try:
        for rep in range(args.reps):
            for n in STREAMS:
                for config, engine in engines.items():
                    chosen = prompts[rep * max(STREAMS) :][:n]
                    row = {
                        "rep": rep,
                        "config": config,
                        "streams": n,
                        **run_streams(engine, chosen, args.max_tokens),
                    }
                    rows.append(row)
                    r = row
                    print(
                        f"rep {rep} {config:7} N={n}: {r['tokens_per_s']:.2f} tok/s, pass {r['pass_ms']:.0f}"
                        f" ms (bare {r['bare_ms']:.0f}), gap {r['gap_ms']:.1f} ms,"
                        f" in passes {r['in_passes']:.1%}",
                        flush=True,
                    )
    finally:
        for engine in engines.values():
            engine.close()
    summary = []
    for config in engines:
        base = median([r["tokens_per_s"] for r in rows if r["config"] == config and r["streams"] == 1])
        for n in STREAMS:
            mine = [r for r in rows if r["config"] == config and r["streams"] == n]
            rate = median([r["tokens_per_s"] for r in mine])
            summary.append(
                {
                    "config": config,
                    "streams": n,
                    "tokens_per_s": rate,
                    "vs_one": rate / base,
                    **{
                        k: median([r[k] for r in mine]) for k in ("pass_ms", "bare_ms", "gap_ms", "in_passes")
                    },
                }
            )
    print("\n| setting | streams | tokens/s | vs 1 stream | pass ms | bare pass ms | gap ms | in passes |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(
            f"| {s['config']} | {s['streams']} | {s['tokens_per_s']:.2f} | {s['vs_one']:.2f}× |"
            f" {s['pass_ms']:.0f} | {s['bare_ms']:.0f} | {s['gap_ms']:.1f} | {s['in_passes']:.1%} |"
        )
    write_run(args.out, args, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
