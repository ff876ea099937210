"""Engine overhead: `edgespec run --draft none` against llama-cpp-python's own create_completion.

Same model, threads, prompt and number of new tokens (greedy, penalties off, no prefix reuse),
interleaved round by round so machine drift hits every configuration alike. edgespec runs twice:
with llama.cpp's default kernels (`--kernels fast`, the like-for-like comparison of the Python
engine against llama-cpp-python) and with the batch-invariant kernels that make speculative output
identical to target-only (`--kernels exact`, the default), to show what exactness costs.

    python benchmarks/engine_overhead.py [--rounds 5] [--max-tokens 128] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, write_json  # noqa: E402

PROMPT = "Write a detailed, step-by-step tutorial on implementing a hash map in C, with code."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="write every measurement as JSON")
    args = parser.parse_args()

    import llama_cpp

    from edgespec.chat import prompt_tokens
    from edgespec.engine import GenerationSettings, SpeculativeEngine
    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime, default_threads

    threads = args.threads or default_threads()
    path = models.resolve(models.TARGET)
    runtimes = {
        kernels: LlamaCppRuntime(path, RuntimeSettings(n_ctx=args.ctx, n_threads=threads, kernels=kernels))
        for kernels in ("fast", "exact")
    }
    tokens = prompt_tokens(runtimes["exact"], PROMPT)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=args.ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )

    def run_llama() -> tuple[float, list[int]]:
        llm.reset()  # no prefix reuse: both sides process the prompt every time
        out: list[int] = []
        start = time.perf_counter()
        for chunk in llm.create_completion(
            tokens,
            max_tokens=args.max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            top_k=1,
            stream=True,
            logprobs=None,
        ):
            out.append(chunk)
        return time.perf_counter() - start, []

    def run_edgespec(kernels: str) -> tuple[float, list[int]]:
        engine = SpeculativeEngine(runtimes[kernels])
        start = time.perf_counter()
        gen = engine.generate(tokens, GenerationSettings(max_tokens=args.max_tokens, draft_max=0))
        for _ in gen:
            pass
        return time.perf_counter() - start, gen.tokens

    configs = {
        "llama-cpp-python create_completion": run_llama,
        "edgespec --draft none --kernels fast": lambda: run_edgespec("fast"),
        "edgespec --draft none --kernels exact": lambda: run_edgespec("exact"),
    }
    for fn in configs.values():  # warm-up, excluded
        fn()
    llama_tokens = _llama_token_count(llm, tokens, args.max_tokens)
    times: dict[str, list[float]] = {name: [] for name in configs}
    produced: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name, fn in configs.items():
            seconds, toks = fn()
            times[name].append(seconds)
            produced[name] = len(toks) if toks else llama_tokens
        print(
            f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n}: {times[n][-1]:.2f}s" for n in configs),
            file=sys.stderr,
            flush=True,
        )

    base = median(times["llama-cpp-python create_completion"])
    print(
        f"\nprompt: {len(tokens)} tokens; new tokens: {args.max_tokens}; threads: {threads}; "
        f"rounds: {args.rounds} (median)\n"
    )
    print("| configuration | new tokens | median s | tokens/s (end to end) | vs llama-cpp-python |")
    print("|---|---|---|---|---|")
    rows = []
    for name in configs:
        med = median(times[name])
        tps = produced[name] / med
        rows.append(
            {
                "config": name,
                "seconds": times[name],
                "median_s": med,
                "new_tokens": produced[name],
                "tokens_per_s": tps,
                "relative": base / med,
            }
        )
        print(f"| {name} | {produced[name]} | {med:.2f} | {tps:.2f} | {base / med:.1%} |")
    if args.out:
        write_json(
            args.out,
            {
                "machine": machine(),
                "prompt_tokens": len(tokens),
                "threads": threads,
                "max_tokens": args.max_tokens,
                "rows": rows,
            },
        )


def _llama_token_count(llm, tokens: list[int], max_tokens: int) -> int:
    """How many tokens create_completion produced (it must be max_tokens for a fair comparison)."""
    llm.reset()
    result = llm.create_completion(
        tokens, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, top_k=1
    )
    return int(result["usage"]["completion_tokens"])


if __name__ == "__main__":
    main()
