"""How often an n-gram draft's first token is accepted, by the length of the match behind it.

Replays the default target's greedy answers through `NgramDrafter` (no timing involved: greedy
verification accepts exactly the draft tokens that equal the target's own next tokens), counting,
per match-length bucket of `edgespec.control.MATCH_BUCKETS`, how often the first drafted token is
right and how often a later one is right given the ones before it were. These are the priors of the
goodput controller (`edgespec.control.NGRAM_PRIOR`); the controller then learns online.

    python benchmarks/ngram_acceptance.py --per-category 3 --out benchmarks/results/ngram_acceptance.json

The prompts are the LAST N of each Spec-Bench category, which the benchmarks (the first N) do not
use. The target's answers are cached in --answers so the statistics can be recomputed quickly.

With --oracle-costs PROFILE.toml it instead bounds what n-gram drafting could reach on that
profile's measured cost curve (BENCHMARKS.md, issue 6):

    python benchmarks/ngram_acceptance.py --dataset benchmarks/prompts/code_rewrite.jsonl \
        --answers /tmp/code-rewrite-answers.json --oracle-costs ~/.config/edgespec/profiles/tuned-….toml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgespec.bench.datasets import last_per_category, read_prompts, spec_bench_path
from edgespec.control import MATCH_BUCKETS, match_bucket
from edgespec.drafting import NgramDrafter


def answers(path: Path, per_category: int, max_tokens: int, dataset: str | None = None) -> list[dict]:
    if path.exists():
        return json.loads(path.read_text())
    from edgespec.chat import chat_tokens
    from edgespec.engine import GenerationSettings
    from edgespec.load.builder import load
    from edgespec.runtimes.base import RuntimeSettings

    pair = load(None, "none", RuntimeSettings())
    target = pair.engine.target
    template = target.chat_template()
    out = []
    items = (
        read_prompts(dataset) if dataset else last_per_category(read_prompts(spec_bench_path()), per_category)
    )
    for item in items:
        tokens = chat_tokens(target, template, [{"role": "user", "content": item.prompt}])
        gen = pair.engine.generate(tokens, GenerationSettings(max_tokens=max_tokens, draft_max=0)).run()
        out.append({"id": item.id, "category": item.category, "prompt": tokens, "output": gen.tokens})
    pair.close()
    path.write_text(json.dumps(out))
    return out


def oracle(seq: list[int], start: int, ratios: list[float]) -> float:
    """Speed-up over target-only of n-gram drafting with perfect foresight: at every step the
    drafter's proposal is cut to the length that maximises tokens per unit of time, knowing how
    many of its tokens the target will accept. `ratios[n - 1]` = T(n) / T(1)."""
    drafter = NgramDrafter(n_min=1, n_max=8)
    drafter.begin(seq[: start - 1])
    t, time = start, 0.0
    while t < len(seq):
        draft = drafter.propose(seq[:t], min(len(ratios) - 1, len(seq) - t - 1)).tokens
        good = 0
        while good < len(draft) and draft[good] == seq[t + good]:
            good += 1
        k = max(range(good + 1), key=lambda k: (k + 1) / ratios[k])
        time += ratios[k]
        t += k + 1
    return (len(seq) - start) / time if time else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8, help="draft length replayed")
    parser.add_argument("--answers", type=Path, default=Path("/tmp/edgespec-ngram-answers.json"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dataset", help="a JSONL prompt file instead of Spec-Bench's last N per category")
    parser.add_argument(
        "--oracle-costs",
        type=Path,
        help="a tuned profile (.toml): also print the perfect-foresight n-gram speed-up per category "
        "on its T(n) curve, and the most any drafter could reach (every draft accepted)",
    )
    args = parser.parse_args()
    if args.oracle_costs:
        import math

        from edgespec.placement.profiles import read_profile

        costs = read_profile(args.oracle_costs).costs
        if costs is None:
            parser.error(f"{args.oracle_costs} has no [costs]")
        ratios = [t / costs.t_verify_ms[0] for t in costs.t_verify_ms]
        ceiling = max(n / r for n, r in enumerate(ratios, start=1))
        print(f"every draft accepted, best n: {ceiling:.3f}x")
        by_category: dict[str, list[float]] = {}
        for item in answers(args.answers, args.per_category, args.max_tokens, args.dataset):
            seq = item["prompt"] + item["output"]
            by_category.setdefault(item["category"], []).append(oracle(seq, len(item["prompt"]) + 1, ratios))
        for category, values in sorted(by_category.items()):
            geo = math.exp(sum(math.log(v) for v in values) / len(values))
            print(f"oracle n-gram speed-up, {category}: {geo:.3f}x over {len(values)} prompts")
        return
    first = [[0, 0] for _ in MATCH_BUCKETS]  # [drafts, first token right]
    later = [[0, 0] for _ in MATCH_BUCKETS]  # [later tokens tried, right]
    for item in answers(args.answers, args.per_category, args.max_tokens):
        seq = item["prompt"] + item["output"]
        drafter = NgramDrafter(n_min=1, n_max=8)
        start = len(item["prompt"]) + 1
        drafter.begin(seq[: start - 1])
        t = start
        while t < len(seq):
            draft = drafter.propose(seq[:t], min(args.k, len(seq) - t)).tokens
            n = 0
            while n < len(draft) and draft[n] == seq[t + n]:
                n += 1
            if draft:
                b = match_bucket(drafter.match_length)
                first[b][0] += 1
                first[b][1] += n > 0
                tried = min(n + 1, len(draft)) - 1  # later positions reached
                later[b][0] += max(tried, 0)
                later[b][1] += max(min(n, len(draft)) - 1, 0)
            t += n + 1
    rows = []
    print("| match length | drafts | first token accepted | later token accepted (given earlier) |")
    print("|---|---|---|---|")
    for i, lo in enumerate(MATCH_BUCKETS):
        hi = MATCH_BUCKETS[i + 1] - 1 if i + 1 < len(MATCH_BUCKETS) else None
        label = f"{lo}" if hi == lo else f"{lo}-{hi}" if hi else f"{lo}+"
        f = first[i][1] / first[i][0] if first[i][0] else None
        g = later[i][1] / later[i][0] if later[i][0] else None
        rows.append({"bucket": label, "drafts": first[i][0], "first": f, "later": g})
        shown = ["–" if x is None else f"{x:.2f}" for x in (f, g)]
        print(f"| {label} | {first[i][0]} | {shown[0]} | {shown[1]} |")
    if args.out:
        args.out.write_text(
            json.dumps({"per_category": args.per_category, "k": args.k, "buckets": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
