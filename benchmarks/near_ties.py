"""Where the default's greedy output leaves target-only decoding, and how close the call was.

    python benchmarks/near_ties.py --per-category 2 --out benchmarks/results/near_ties.json

Under the default *distribution* guarantee (llama.cpp's kernels) a verification pass rounds
otherwise than a single-token step, so at temperature 0 a near-tie can break the other way and the
output leave target-only decoding from there on. For each Spec-Bench prompt this runs the default
`Engine()` and its target-only decoding (draft_max = 0), greedy, the whole prompt evaluated each
time; where the two texts differ it finds the first differing token and replays target-only
decoding up to it (the prompt in one pass, then one token a step, as target-only decodes) to read
the target's margin there: its top logit minus the runner-up. A margin that a rounding difference
can cover (llama.cpp's batched rows differ from single steps by up to 0.63 in a logit on the
default target, BENCHMARKS.md) shows a near-tie, not a fault.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, spec_bench_prompts, write_json  # noqa: E402


def margin_at(target: Any, prompt: list[int], generated: list[int], position: int) -> tuple[float, int, int]:
    """Target-only's top-1 minus top-2 logit before generated[position], and those two tokens."""
    target.truncate(0)
    row = target.eval(prompt, logits="last")[0]
    for token in generated[:position]:
        row = target.eval([token], logits="last")[0]
    order = np.argsort(row)[::-1]
    return float(row[order[0]] - row[order[1]]), int(order[0]), int(order[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec import Engine

    engine = Engine(on_note=lambda line: print(line, file=sys.stderr))
    target = engine._pair.engine.target
    records = []
    for item in spec_bench_prompts(args.per_category, 13):
        prompt = engine.tokenize(item["prompt"])
        spec = engine.generate(prompt, max_tokens=args.max_tokens, cache_prompt=False)
        plain = engine.generate(prompt, max_tokens=args.max_tokens, cache_prompt=False, draft_max=0)
        record: dict[str, Any] = {
            "prompt_id": item["id"],
            "category": item["category"],
            "identical": spec.tokens == plain.tokens,
            "tau": spec.stats.tokens_per_step,
            "steps": spec.stats.n_steps,
        }
        if not record["identical"]:
            position = next(
                (i for i, (a, b) in enumerate(zip(spec.tokens, plain.tokens, strict=False)) if a != b),
                min(len(spec.tokens), len(plain.tokens)),
            )
            margin, top, second = margin_at(target, prompt, list(plain.tokens), position)
            spec_token = spec.tokens[position] if position < len(spec.tokens) else None
            record.update(position=position, margin=margin, target_only_token=top, runner_up=second)
            record["default_took_runner_up"] = spec_token == second
        records.append(record)
        print(
            f"{item['category']}/{item['id']}: "
            + (
                "identical"
                if record["identical"]
                else f"differs at token {record['position']}, margin "
                f"{record['margin']:.3f}, default took the runner-up: {record['default_took_runner_up']}"
            ),
            file=sys.stderr,
        )
    engine.close()
    differ = [r for r in records if not r["identical"]]
    print(f"identical: {len(records) - len(differ)}/{len(records)}")
    if differ:
        margins = sorted(r["margin"] for r in differ)
        print(
            f"first difference: median token {statistics.median(r['position'] for r in differ)}, "
            f"margin median {statistics.median(margins):.3f}, max {margins[-1]:.3f}; "
            f"default took target-only's runner-up in {sum(r['default_took_runner_up'] for r in differ)}"
            f"/{len(differ)}"
        )
    if args.out:
        write_json(args.out, {"machine": machine(), "max_tokens": args.max_tokens, "records": records})


if __name__ == "__main__":
    main()
