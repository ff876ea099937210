"""Target-only vs model drafter vs n-gram drafter on the default pair, side by side in one run.

For each prompt the configurations run back to back on the same loaded models (A B C, A B C, ...),
greedy, with the same chat formatting; every speculative output is compared token for token with
target-only's, and a difference fails the run. Prompts: the first Spec-Bench prompt of each of 12
categories, plus one code-rewriting prompt whose answer repeats the prompt's code.

    python benchmarks/speculative.py [--max-tokens 128] [--draft-max 4] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import geometric_mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CODE_REWRITE_PROMPT, machine, median, spec_bench_prompts, write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--draft-max", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--kernels", choices=["exact", "fast"], default="exact")
    parser.add_argument("--prompts", choices=["all", "spec-bench", "code-rewrite"], default="all")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per prompt and configuration (interleaved)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write every measurement as JSON")
    args = parser.parse_args()

    from edgespec import models
    from edgespec.drafting import ModelDrafter, NgramDrafter
    from edgespec.engine import GenerationSettings, SpeculativeEngine
    from edgespec.loader import prompt_tokens
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime, default_threads

    threads = args.threads or default_threads()
    settings = RuntimeSettings(n_ctx=args.ctx, n_threads=threads, kernels=args.kernels)
    target = LlamaCppRuntime(models.resolve(models.TARGET), settings)
    draft = LlamaCppRuntime(models.resolve(models.DRAFT), settings)
    engines = {
        "target-only": (SpeculativeEngine(target), 0),
        f"draft k={args.draft_max}": (
            SpeculativeEngine(target, ModelDrafter(draft, target.vocab.n_vocab)),
            args.draft_max,
        ),
        f"ngram k={args.draft_max}": (SpeculativeEngine(target, NgramDrafter()), args.draft_max),
    }
    prompts = spec_bench_prompts(per_category=1, categories=12) if args.prompts != "code-rewrite" else []
    if args.prompts != "spec-bench":
        prompts.append({"id": "code-rewrite", "category": "code-rewrite", "prompt": CODE_REWRITE_PROMPT})

    # warm-up, excluded from the figures
    warm = prompt_tokens(target, "Say hello.")
    for engine, k in engines.values():
        engine.generate(warm, GenerationSettings(max_tokens=8, draft_max=k)).run()

    records, failures = [], []
    for i, item in enumerate(prompts, 1):
        tokens = prompt_tokens(target, item["prompt"])
        for repeat in range(args.repeat):
            results = {}
            for name, (engine, k) in engines.items():
                gen = engine.generate(
                    tokens, GenerationSettings(max_tokens=args.max_tokens, draft_max=k)
                ).run()
                results[name] = gen
                identical = gen.tokens == results["target-only"].tokens
                records.append(
                    {
                        "repeat": repeat,
                        "prompt_id": item["id"],
                        "category": item["category"],
                        "config": name,
                        "prompt_tokens": len(tokens),
                        **gen.stats.to_dict(),
                        "identical_to_target_only": identical,
                    }
                )
                if not identical:
                    failures.append(f"{item['id']} {name}")
            summary = ", ".join(
                f"{n} {g.stats.tokens_per_second:.1f} tok/s τ={g.stats.tokens_per_step:.2f}"
                for n, g in results.items()
            )
            print(f"[{i}/{len(prompts)}] {item['category']}: {summary}", file=sys.stderr, flush=True)

    def per_prompt(rows: list[dict], name: str, key: str) -> dict[str, float]:
        """Median over repeats of one measurement, per prompt."""
        values: dict[str, list[float]] = {}
        for r in rows:
            if r["config"] == name:
                values.setdefault(r["prompt_id"], []).append(r[key])
        return {pid: median(v) for pid, v in values.items()}

    def table(rows: list[dict], title: str) -> None:
        if not rows:
            return
        print(f"\n{title}\n")
        print(
            "| configuration | tokens/s (median) | speed-up vs target-only (geometric mean per prompt) "
            "| τ: tokens per target pass (mean) | acceptance | prompt s (median) | drafting s | verifying s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        base = per_prompt(rows, "target-only", "tokens_per_second")
        for name in engines:
            mine = [r for r in rows if r["config"] == name]
            tps = per_prompt(rows, name, "tokens_per_second")
            ratios = [tps[pid] / base[pid] for pid in tps]
            drafted = sum(r["n_drafted"] for r in mine)
            acc = f"{sum(r['n_accepted'] for r in mine) / drafted:.1%}" if drafted else "–"
            tau = sum(r["tokens_per_step"] for r in mine) / len(mine)
            n_runs = args.repeat
            print(
                f"| {name} | {median(list(tps.values())):.2f} | {geometric_mean(ratios):.2f}x "
                f"| {tau:.2f} | {acc} | {median([r['t_prompt'] for r in mine]):.2f} "
                f"| {sum(r['t_draft'] for r in mine) / n_runs:.1f} "
                f"| {sum(r['t_verify'] for r in mine) / n_runs:.1f} |"
            )

    print(
        f"\nthreads {threads}, kernels {args.kernels}, {args.max_tokens} new tokens, greedy, "
        f"{args.repeat} run(s) per prompt and configuration (drafting/verifying s: per run)"
    )
    table([r for r in records if r["category"] != "code-rewrite"], "12 Spec-Bench prompts (one per category)")
    table([r for r in records if r["category"] == "code-rewrite"], "code-rewriting prompt")
    print(f"\noutputs identical to target-only: {'all' if not failures else 'NO: ' + ', '.join(failures)}")
    if args.out:
        write_json(
            args.out,
            {
                "machine": machine(),
                "threads": threads,
                "kernels": args.kernels,
                "max_tokens": args.max_tokens,
                "draft_max": args.draft_max,
                "records": records,
            },
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
