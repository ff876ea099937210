"""The default edgespec against llama-cpp-python at long prompts and across a growing chat.

    python benchmarks/long_context.py --repeat 2 --out benchmarks/results/long_context.json

Prompts of about 100, 1,000, 2,000 and 3,500 tokens (a question about a piece of edgespec's own
source, cut to length), each decoded greedily for --max-tokens tokens by:
- `llama.cpp`: llama-cpp-python's `create_completion`, default context parameters (the yardstick);
- `edgespec`: `Engine()` as users run it (`--profile auto`, llama.cpp's kernels);
- `edgespec target-only`: the same engine with draft_max = 0;
interleaved (A B C, C B A, ...: odd repetitions in reverse order, as odd chat turns), the
whole prompt evaluated every time. Then a 6-turn chat that
grows to about 3,500 tokens (each user turn adds a ~500-token piece of source and a question):
`Engine.chat` against `Llama.create_chat_completion`, turn by turn, each keeping its own prefix
cache as a chat app would. Reported: decode tokens/s and time to first token, and their ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_json  # noqa: E402

LENGTHS = (100, 1000, 2000, 3500)
SOURCES = ("edgespec/engine.py", "edgespec/control.py", "edgespec/drafting.py", "edgespec/sampling.py")
QUESTION = "Explain briefly what the main class in this code does."


def corpus() -> str:
    return "\n\n".join((ROOT / name).read_text(encoding="utf-8") for name in SOURCES)


def piece_of(plain: Any, text_tokens: list[int], start: int, stop: int) -> str:
    return plain.llm.detokenize(text_tokens[start:stop]).decode("utf-8", "replace")


def prompt_of_length(engine: Any, plain: Any, text_tokens: list[int], target: int) -> list[int]:
    """Chat tokens of about `target` tokens: the question about a prefix of the corpus."""
    shell = len(engine.tokenize(QUESTION + "\n\n```python\n\n```"))
    piece = piece_of(plain, text_tokens, 0, max(target - shell, 1))
    return engine.tokenize(f"{QUESTION}\n\n```python\n{piece}\n```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--no-target-only", action="store_true", help="skip edgespec's own target-only")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths (empty: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec import Engine
    from edgespec.bench.yardstick import LlamaCppPlain
    from edgespec.runtimes.llama_cpp import default_threads

    threads = args.threads or default_threads()
    info = machine()
    n_ctx = 4096
    engine = Engine(n_ctx=n_ctx, threads=threads, on_note=lambda line: print(line, file=sys.stderr))
    plain = LlamaCppPlain(engine.target_path, n_ctx, threads)
    text_tokens = plain.llm.tokenize(corpus().encode("utf-8"), add_bos=False, special=False)

    warm = engine.tokenize("Say hi.")
    plain.complete(warm, 8)
    engine.generate(warm, max_tokens=8, cache_prompt=False)

    records: list[dict[str, Any]] = []
    lengths = [int(n) for n in args.lengths.split(",") if n]
    for length in lengths:
        tokens = prompt_of_length(engine, plain, text_tokens, length)
        for rep in range(args.repeat):

            def run_plain(rep: int = rep, tokens: list[int] = tokens, length: int = length) -> dict[str, Any]:
                res = plain.complete(tokens, args.max_tokens)
                return {
                    "length": length,
                    "prompt_tokens": len(tokens),
                    "repeat": rep,
                    "config": "llama.cpp",
                    "tokens_per_second": res.tokens_per_second,
                    "ttft": res.t_first,
                    "text": res.text,
                }

            def run_edgespec(
                config: str,
                draft_max: int | None,
                rep: int = rep,
                tokens: list[int] = tokens,
                length: int = length,
            ) -> dict[str, Any]:
                options: dict[str, Any] = {"max_tokens": args.max_tokens, "cache_prompt": False}
                if draft_max is not None:
                    options["draft_max"] = draft_max
                result = engine.generate(tokens, **options)
                return {
                    "length": length,
                    "prompt_tokens": len(tokens),
                    "repeat": rep,
                    "config": config,
                    "tokens_per_second": result.stats.tokens_per_second,
                    "ttft": result.stats.t_prompt,
                    "tau": result.stats.tokens_per_step,
                    "text": result.text,
                }

            configs = [("edgespec", None)] + ([] if args.no_target_only else [("edgespec target-only", 0)])
            runs = [run_plain] + [lambda c=c, k=k: run_edgespec(c, k) for c, k in configs]
            # Odd repetitions run in reverse order, so that neither side always follows the other.
            records += [run() for run in (runs if rep % 2 == 0 else runs[::-1])]
            print(
                f"{length} ({len(tokens)} tok) rep {rep}: "
                + "  ".join(
                    f"{r['config']}={r['tokens_per_second']:.2f}/{r['ttft']:.2f}s"
                    for r in records[-1 - len(configs) :]
                ),
                file=sys.stderr,
            )

    # A chat growing to ~3,500 tokens: each side keeps its own conversation and prefix cache.
    chat_records: list[dict[str, Any]] = []
    step = max((3500 - 100) // args.turns - args.max_tokens, 64)
    mine: list[dict[str, str]] = []
    theirs: list[dict[str, str]] = []
    engine.reset()
    plain.llm.reset()
    for turn in range(args.turns):
        piece = piece_of(plain, text_tokens, turn * step, (turn + 1) * step)
        message = {
            "role": "user",
            "content": f"Here is more of the code:\n```python\n{piece}\n```\n{QUESTION}",
        }
        theirs.append(message)
        mine.append(message)
        if turn % 2 == 0:  # alternate which side goes first
            res = plain.chat(theirs, args.max_tokens)
            result = engine.chat(mine, max_tokens=args.max_tokens)
        else:
            result = engine.chat(mine, max_tokens=args.max_tokens)
            res = plain.chat(theirs, args.max_tokens)
        theirs.append({"role": "assistant", "content": res.text})
        mine.append({"role": "assistant", "content": result.text})
        chat_records.append(
            {
                "turn": turn + 1,
                "prompt_tokens": result.prompt_tokens,
                "cached": result.stats.n_prompt_cached,
                "llama_cpp_tps": res.tokens_per_second,
                "llama_cpp_ttft": res.t_first,
                "edgespec_tps": result.stats.tokens_per_second,
                "edgespec_ttft": result.stats.t_prompt,
                "edgespec_tau": result.stats.tokens_per_step,
            }
        )
        r = chat_records[-1]
        print(
            f"turn {turn + 1} ({r['prompt_tokens']} tok, {r['cached']} cached): "
            f"llama.cpp {r['llama_cpp_tps']:.2f}/{r['llama_cpp_ttft']:.2f}s  "
            f"edgespec {r['edgespec_tps']:.2f}/{r['edgespec_ttft']:.2f}s",
            file=sys.stderr,
        )

    lines = [
        "| prompt tokens | llama.cpp tokens/s | edgespec tokens/s (×) | edgespec target-only tokens/s (×) "
        "| llama.cpp first token s | edgespec first token s (×) |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for length in lengths:

        def med(config: str, key: str, length: int = length) -> float:
            return statistics.median(
                r[key] for r in records if r["length"] == length and r["config"] == config
            )

        n = next(r["prompt_tokens"] for r in records if r["length"] == length)
        base, mine_tps = med("llama.cpp", "tokens_per_second"), med("edgespec", "tokens_per_second")
        only = math.nan if args.no_target_only else med("edgespec target-only", "tokens_per_second")
        b_ttft, m_ttft = med("llama.cpp", "ttft"), med("edgespec", "ttft")
        summary.append(
            {
                "prompt_tokens": n,
                "decode_ratio": mine_tps / base,
                "ttft_ratio": m_ttft / b_ttft,
                "target_only_ratio": only / base,
            }
        )
        lines.append(
            f"| {n} | {base:.2f} | {mine_tps:.2f} ({mine_tps / base:.2f}×) | {only:.2f} ({only / base:.2f}×) "
            f"| {b_ttft:.3f} | {m_ttft:.3f} ({m_ttft / b_ttft:.2f}×) |"
        )
    lines += [
        "",
        "| turn | prompt tokens (reused) | llama.cpp tokens/s | edgespec tokens/s (×) "
        "| llama.cpp first token s | edgespec first token s (×) |",
        "|---|---|---|---|---|---|",
    ]
    for r in chat_records:
        lines.append(
            f"| {r['turn']} | {r['prompt_tokens']} ({r['cached']}) | {r['llama_cpp_tps']:.2f} "
            f"| {r['edgespec_tps']:.2f} ({r['edgespec_tps'] / r['llama_cpp_tps']:.2f}×) "
            f"| {r['llama_cpp_ttft']:.3f} "
            f"| {r['edgespec_ttft']:.3f} ({r['edgespec_ttft'] / r['llama_cpp_ttft']:.2f}×) |"
        )
    print("\n".join(lines))
    if args.out:
        write_json(
            args.out,
            {
                "machine": info,
                "max_tokens": args.max_tokens,
                "threads": threads,
                "profile": engine.profile.name if engine.profile else None,
                "records": records,
                "summary": summary,
                "chat": chat_records,
            },
        )
    plain.close()
    engine.close()


if __name__ == "__main__":
    main()
