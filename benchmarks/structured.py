"""Structured output on the default pair: JSON-schema-constrained decoding against llama.cpp's own.

    python benchmarks/structured.py --out benchmarks/results/structured.json

For every prompt of `benchmarks/prompts/structured.jsonl` (JSON extraction from text, and JSON
describing code, each with a nested schema), in this order, greedy, on the same chat-formatted
tokens, the same threads, the whole prompt evaluated each time:
- `llama.cpp`: llama-cpp-python's `create_completion`, unconstrained (the yardstick);
- `llama.cpp grammar`: the same with `grammar=LlamaGrammar.from_json_schema(schema)`, which is
  how llama-cpp-python's users get JSON that parses (the peer);
- `edgespec`: `Engine()` as users run it (`--profile auto`), unconstrained;
- `edgespec constrained target-only`: json_schema, draft_max = 0;
- `edgespec constrained`: json_schema with the default drafting, where forced tokens are drafts.
Per configuration: decode tokens/s (tokens after the first over the time after the first), the
share of output tokens that were forced drafts, τ (tokens per target pass), and the share of
answers that parse and validate against the schema (an answer cut by max_tokens counts as
invalid). Speed-ups are per-prompt ratios over a reference, summarised by geometric mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, geomean, machine, write_json  # noqa: E402

PROMPTS = ROOT / "benchmarks" / "prompts" / "structured.jsonl"
CONFIGS = (
    "llama.cpp",
    "llama.cpp grammar",
    "edgespec",
    "edgespec constrained target-only",
    "edgespec constrained",
)


def valid(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def unfenced(text: str) -> str:
    """The inside of a Markdown code block, where an unconstrained answer puts its JSON."""
    start = text.find("```")
    if start < 0:
        return text
    body = text[start + 3 :]
    body = body[body.find("\n") + 1 :] if "\n" in body else body
    end = body.find("```")
    return body if end < 0 else body[:end]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for category in ("all", *sorted({r["category"] for r in records})):
        mine = [r for r in records if category in ("all", r["category"])]
        by = {(r["prompt_id"], r["config"]): r for r in mine}
        for config in CONFIGS:
            runs = [r for r in mine if r["config"] == config]
            if not runs:
                continue

            def ratio(reference: str, runs: list[dict[str, Any]] = runs, by: dict[Any, Any] = by) -> float:
                return geomean(
                    [
                        r["tokens_per_second"] / by[(r["prompt_id"], reference)]["tokens_per_second"]
                        for r in runs
                        if by.get((r["prompt_id"], reference), {}).get("tokens_per_second")
                    ]
                )

            generated = sum(r["n_generated"] for r in runs)
            rows.append(
                {
                    "category": category,
                    "config": config,
                    "prompts": len(runs),
                    "median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
                    "vs_llama_cpp": ratio("llama.cpp"),
                    "vs_llama_cpp_grammar": ratio("llama.cpp grammar"),
                    "vs_edgespec_unconstrained": ratio("edgespec"),
                    "forced_share": sum(r.get("n_forced_accepted", 0) for r in runs) / generated,
                    "tau": statistics.mean(r["tau"] for r in runs if r.get("tau"))
                    if "tau" in runs[0]
                    else None,
                    "valid_share": sum(r["valid"] for r in runs) / len(runs),
                    "valid_in_code_block_share": sum(r["valid_in_code_block"] for r in runs) / len(runs),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| set | configuration | tokens/s (median) | vs llama.cpp | vs llama.cpp grammar | "
        "vs edgespec unconstrained | forced share | τ | valid | valid in a code block |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(
            f"| {r['category']} | {r['config']} | {r['median_tokens_per_second']:.2f} | "
            f"{r['vs_llama_cpp']:.2f}× | "
            f"{r['vs_llama_cpp_grammar']:.2f}× | {r['vs_edgespec_unconstrained']:.2f}× | "
            f"{r['forced_share']:.0%} | {tau} | {r['valid_share']:.0%} | "
            f"{r['valid_in_code_block_share']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec import Engine
    from edgespec.bench.yardstick import LlamaCppPlain
    from edgespec.runtimes.llama_cpp import default_threads

    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = prompts[: args.limit] if args.limit else prompts
    threads = args.threads or default_threads()
    engine = Engine(n_ctx=args.ctx, threads=threads, on_note=lambda line: print(line, file=sys.stderr))
    plain = LlamaCppPlain(engine.target_path, args.ctx, threads)

    def edgespec_run(
        tokens: list[int], schema: dict[str, Any] | None, draft_max: int | None
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"max_tokens": args.max_tokens, "cache_prompt": False}
        if schema is not None:
            options["json_schema"] = schema
        if draft_max is not None:
            options["draft_max"] = draft_max
        result = engine.generate(tokens, **options)
        s = result.stats
        return {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "tokens_per_second": s.tokens_per_second,
            "ttft": s.t_prompt,
            "n_generated": s.n_generated,
            "n_forced": s.n_forced,
            "n_forced_accepted": s.n_forced_accepted,
            "tau": s.tokens_per_step,
            "acceptance": s.acceptance_rate,
            "sources": None if result.sources is None else {k: vars(v) for k, v in result.sources.items()},
        }

    def plain_run(tokens: list[int], schema: dict[str, Any] | None) -> dict[str, Any]:
        res = plain.complete(
            tokens, args.max_tokens, json_schema=None if schema is None else json.dumps(schema)
        )
        return {
            "text": res.text,
            "finish_reason": "length" if res.n_generated >= args.max_tokens else "stop",
            "tokens_per_second": res.tokens_per_second,
            "ttft": res.t_first,
            "n_generated": res.n_generated,
        }

    warm = engine.tokenize("Say hi.")  # warm-up, not recorded
    plain.complete(warm, 8)
    engine.generate(warm, max_tokens=8, cache_prompt=False, json_schema={"type": "object"})

    records: list[dict[str, Any]] = []
    for i, item in enumerate(prompts):
        tokens = engine.tokenize(item["prompt"])
        schema = item["schema"]
        runs = {
            "llama.cpp": plain_run(tokens, None),
            "llama.cpp grammar": plain_run(tokens, schema),
            "edgespec": edgespec_run(tokens, None, None),
            "edgespec constrained target-only": edgespec_run(tokens, schema, 0),
            "edgespec constrained": edgespec_run(tokens, schema, None),
        }
        for config, run in runs.items():
            whole = run["finish_reason"] == "stop"
            records.append(
                {
                    "prompt_id": item["id"],
                    "category": item["category"],
                    "config": config,
                    **run,
                    "valid": whole and valid(run["text"], schema),
                    "valid_in_code_block": whole and valid(unfenced(run["text"]), schema),
                }
            )
        if args.out:  # what is measured so far, in case the run is cut short
            write_json(args.out.with_suffix(".partial.json"), {"records": records})
        same = runs["edgespec constrained"]["text"] == runs["edgespec constrained target-only"]["text"]
        print(
            f"[{i + 1}/{len(prompts)}] {item['id']}: "
            + ", ".join(f"{c} {r['tokens_per_second']:.1f}" for c, r in runs.items())
            + f" tok/s; constrained forced {runs['edgespec constrained']['n_forced_accepted']}"
            f"/{runs['edgespec constrained']['n_generated']}; same as target-only: {same}",
            file=sys.stderr,
        )
    rows = summarize(records)
    print(table(rows))
    if args.out:
        info = machine()
        write_json(
            args.out,
            {
                "machine": info,
                "threads": threads,
                "max_tokens": args.max_tokens,
                "summary": rows,
                "records": records,
            },
        )


if __name__ == "__main__":
    main()
