"""edgespec as users run it against llama.cpp as users run it, prompt by prompt, interleaved.

    python benchmarks/yardstick.py --set benchmarks/prompts/code_edits.jsonl \
        --set benchmarks/prompts/code_rewrite.jsonl --spec-bench 5 \
        --llama-cpp-bin /path/to/llama.cpp/build/bin --out benchmarks/results/yardstick.json

For every prompt, in this order, on the default pair (greedy, the same chat-formatted tokens,
the same threads, the whole prompt evaluated each time):
- `llama.cpp`: llama-cpp-python's `Llama.create_completion` with its default context parameters
  (`edgespec.bench.yardstick`), the yardstick;
- `edgespec` (default): `Engine()`, i.e. `--profile auto` on llama.cpp's kernels;
- `edgespec target-only`: the same engine with draft_max = 0;
- `edgespec exact` and `edgespec exact target-only`: `Engine(kernels="exact")`, the opt-in
  guarantee, whose output must equal its own target-only output on every prompt;
- llama.cpp's speculative modes (`llama-speculative-simple --spec-type ngram-simple |
  ngram-map-k | ngram-mod | draft-simple`), when the binary is found; its own decode-phase
  tokens/s.
Speed-ups are per-prompt ratios of decode tokens/s over llama.cpp's, summarised by geometric mean
per set (and per category for Spec-Bench).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import geomean, machine, spec_bench_prompts, write_json  # noqa: E402


def read_set(path: Path) -> list[dict[str, Any]]:
    from edgespec.bench.datasets import read_prompts

    return [
        {"id": p.id, "category": p.category, "prompt": p.prompt, "set": path.stem} for p in read_prompts(path)
    ]


def summarize(records: list[dict[str, Any]], group: str) -> list[dict[str, Any]]:
    """Per configuration and group: median tokens/s, geometric-mean speed-up over llama.cpp, τ, rates."""
    rows = []
    groups = sorted({r[group] for r in records})
    configs = list(dict.fromkeys(r["config"] for r in records))
    for g in groups:
        mine = [r for r in records if r[group] == g]
        base = {r["prompt_id"]: r["tokens_per_second"] for r in mine if r["config"] == "llama.cpp"}
        ttft = {r["prompt_id"]: r["ttft"] for r in mine if r["config"] == "llama.cpp"}
        for config in configs:
            runs = [r for r in mine if r["config"] == config and r["tokens_per_second"]]
            if not runs:
                continue
            ratios = [r["tokens_per_second"] / base[r["prompt_id"]] for r in runs if base.get(r["prompt_id"])]
            ttft_ratios = [
                r["ttft"] / ttft[r["prompt_id"]] for r in runs if r.get("ttft") and ttft.get(r["prompt_id"])
            ]
            same = [r["identical_to_llama_cpp"] for r in runs if r.get("identical_to_llama_cpp") is not None]
            same_t = [
                r["identical_to_target_only"] for r in runs if r.get("identical_to_target_only") is not None
            ]
            taus = [r["tau"] for r in runs if r.get("tau")]
            rows.append(
                {
                    "group": g,
                    "config": config,
                    "prompts": len(runs),
                    "tokens_per_s_median": statistics.median(r["tokens_per_second"] for r in runs),
                    "speedup_geomean": geomean(ratios),
                    "speedup_min": min(ratios) if ratios else float("nan"),
                    "speedup_max": max(ratios) if ratios else float("nan"),
                    "ttft_ratio_geomean": geomean(ttft_ratios) if ttft_ratios else None,
                    "tau": statistics.mean(taus) if taus else None,
                    "identical_to_llama_cpp": (sum(same), len(same)) if same else None,
                    "identical_to_target_only": (sum(same_t), len(same_t)) if same_t else None,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| set | configuration | prompts | tokens/s median | × llama.cpp (geo. mean) | per prompt | τ "
        "| same as llama.cpp | same as its target-only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "–" if r["identical_to_llama_cpp"] is None else "{}/{}".format(*r["identical_to_llama_cpp"])
        same_t = (
            "–" if r["identical_to_target_only"] is None else "{}/{}".format(*r["identical_to_target_only"])
        )
        tau = "–" if r["tau"] is None else f"{r['tau']:.2f}"
        out.append(
            f"| {r['group']} | {r['config']} | {r['prompts']} | {r['tokens_per_s_median']:.2f} "
            f"| {r['speedup_geomean']:.2f}× | {r['speedup_min']:.2f}–{r['speedup_max']:.2f} "
            f"| {tau} | {same} | {same_t} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, action="append", default=[], help="a JSONL prompt file")
    parser.add_argument("--spec-bench", type=int, default=0, help="Spec-Bench prompts per category")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--llama-cpp-bin", default=None, help="folder holding llama-speculative-simple")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-guarantee configurations")
    parser.add_argument("--no-target-only", action="store_true", help="skip edgespec's own target-only")
    parser.add_argument(
        "--spec-types",
        default=",".join(("ngram-simple", "ngram-map-k", "ngram-mod", "draft-simple")),
        help="llama.cpp speculative modes to run as peers (comma-separated; empty: none)",
    )
    parser.add_argument("--only", default=None, help="comma-separated prompt ids")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec import Engine
    from edgespec.bench import peers
    from edgespec.bench.yardstick import LlamaCppPlain
    from edgespec.runtimes.llama_cpp import default_threads

    prompts: list[dict[str, Any]] = []
    for path in args.set:
        prompts += read_set(path)
    if args.spec_bench:
        prompts += [{**p, "set": "spec-bench"} for p in spec_bench_prompts(args.spec_bench, 13)]
    if args.only:
        wanted = set(args.only.split(","))
        prompts = [p for p in prompts if p["id"] in wanted]
    threads = args.threads or default_threads()
    info = machine()

    engine = Engine(n_ctx=args.ctx, threads=threads, on_note=lambda line: print(line, file=sys.stderr))
    exact = None
    if not args.no_exact:
        exact = Engine(
            n_ctx=args.ctx,
            threads=threads,
            kernels="exact",
            on_note=lambda line: print(line, file=sys.stderr),
        )
    plain = LlamaCppPlain(engine.target_path, args.ctx, threads)
    binary = peers.find_speculative_simple(args.llama_cpp_bin) if args.spec_types else None
    draft_path = None
    if binary is not None:
        from edgespec.load import models

        draft_path = models.resolve(models.DRAFT)

    def edgespec_run(eng: Any, tokens: list[int], draft_max: int | None) -> dict[str, Any]:
        options: dict[str, Any] = {"max_tokens": args.max_tokens, "cache_prompt": False}
        if draft_max is not None:
            options["draft_max"] = draft_max
        result = eng.generate(tokens, **options)
        s = result.stats
        return {
            "text": result.text,
            "tokens_per_second": s.tokens_per_second,
            "ttft": s.t_prompt,
            "n_generated": s.n_generated,
            "tau": s.tokens_per_step,
            "acceptance": s.acceptance_rate,
            "guarantee": s.guarantee,
            "sources": None if result.sources is None else {k: vars(v) for k, v in result.sources.items()},
        }

    # warm-up: one short generation each, not recorded
    warm = engine.tokenize("Say hi.")
    plain.complete(warm, 8)
    engine.generate(warm, max_tokens=8, cache_prompt=False)
    if exact is not None:
        exact.generate(warm, max_tokens=8, cache_prompt=False)

    records: list[dict[str, Any]] = []
    for i, item in enumerate(prompts):
        tokens = engine.tokenize(item["prompt"])

        def plain_run(tokens: list[int] = tokens) -> dict[str, Any]:
            res = plain.complete(tokens, args.max_tokens)
            return {
                "text": res.text,
                "tokens_per_second": res.tokens_per_second,
                "ttft": res.t_first,
                "n_generated": res.n_generated,
            }

        in_process: list[tuple[str, Any]] = [
            ("llama.cpp", plain_run),
            ("edgespec", lambda tokens=tokens: edgespec_run(engine, tokens, None)),
        ]
        if not args.no_target_only:
            in_process.append(("edgespec target-only", lambda tokens=tokens: edgespec_run(engine, tokens, 0)))
        if exact is not None:
            in_process.append(("edgespec exact", lambda tokens=tokens: edgespec_run(exact, tokens, None)))
            in_process.append(
                ("edgespec exact target-only", lambda tokens=tokens: edgespec_run(exact, tokens, 0))
            )
        # Odd prompts run the configurations in reverse order, so that none always follows another.
        done = {name: run() for name, run in (in_process if i % 2 == 0 else in_process[::-1])}
        runs: list[tuple[str, dict[str, Any]]] = [(name, done[name]) for name, _ in in_process]
        if binary is not None:
            from edgespec.chat import render_chat

            template = engine._pair.engine.target.chat_template()
            prompt_text = render_chat(template, [{"role": "user", "content": item["prompt"]}])
            peer_prompt = [peers.PeerPrompt(item["id"], prompt_text, tokens, [])]
            for spec_type in [t for t in args.spec_types.split(",") if t]:
                out = peers.guarded(
                    spec_type,
                    lambda spec_type=spec_type, peer_prompt=peer_prompt: peers.llama_speculative_simple(
                        binary,
                        engine.target_path,
                        draft_path,
                        peer_prompt,
                        max_tokens=args.max_tokens,
                        k=16,
                        threads=threads,
                        n_ctx=args.ctx,
                        bin_dir=args.llama_cpp_bin,
                        spec_type=spec_type,
                    ),
                )
                if out.get("status") == "ran":
                    run = out["runs"][0]
                    runs.append(
                        (
                            f"llama.cpp {spec_type}",
                            {"tokens_per_second": run["tokens_per_second"], "acceptance": run["acceptance"]},
                        )
                    )
                else:
                    print(f"{spec_type}: {out['status']}: {out['notes']}", file=sys.stderr)
        texts = dict(runs)
        for config, run in runs:
            own_reference = {
                "edgespec": "edgespec target-only",
                "edgespec exact": "edgespec exact target-only",
            }.get(config)
            record = {
                "prompt_id": item["id"],
                "set": item["set"],
                "category": item["category"],
                "prompt_tokens": len(tokens),
                "config": config,
                **{k: v for k, v in run.items() if k != "text"},
                "identical_to_llama_cpp": run["text"] == texts["llama.cpp"]["text"]
                if "text" in run
                else None,
                "identical_to_target_only": run["text"] == texts[own_reference]["text"]
                if own_reference in texts
                else None,
            }
            records.append(record)
        line = "  ".join(
            f"{c}={r['tokens_per_second']:.1f}" for c, r in runs if r.get("tokens_per_second") is not None
        )
        print(
            f"[{i + 1}/{len(prompts)}] {item['set']}/{item['id']} ({len(tokens)} tok): {line}",
            file=sys.stderr,
        )

    by_set = summarize(records, "set")
    print(markdown(by_set))
    by_category = summarize([r for r in records if r["set"] == "spec-bench"], "category")
    if by_category:
        print()
        print(markdown(by_category))
    if args.out:
        write_json(
            args.out,
            {
                "machine": info,
                "max_tokens": args.max_tokens,
                "threads": threads,
                "profile": engine.profile.name if engine.profile else None,
                "exact_profile": exact.profile.name if exact is not None and exact.profile else None,
                "records": records,
                "by_set": by_set,
                "by_category": by_category,
            },
        )
    plain.close()
    engine.close()
    if exact is not None:
        exact.close()
    mismatches = [
        r for r in records if r["config"] == "edgespec exact" and r["identical_to_target_only"] is False
    ]
    if mismatches:
        raise SystemExit(
            f"exact guarantee broken on {len(mismatches)} prompts: {[r['prompt_id'] for r in mismatches]}"
        )


if __name__ == "__main__":
    main()
