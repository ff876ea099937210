"""How often an n-gram draft's first token is accepted, by the length of the match behind it.

Replays the default target's greedy answers through `NgramDrafter` (no timing involved: greedy
verification accepts exactly the draft tokens that equal the target's own next tokens), counting,
per match-length bucket of `edgespec.control.MATCH_BUCKETS`, how often the first drafted token is
right and how often a later one is right given the ones before it were. These are the priors of the
goodput controller (`edgespec.control.NGRAM_PRIOR`); the controller then learns online.

    python benchmarks/ngram_acceptance.py --per-category 3 --out benchmarks/results/ngram_acceptance.json

The prompts are the LAST N of each Spec-Bench category, which the benchmarks (the first N) do not
use. The target's answers are cached in --answers so the statistics can be recomputed quickly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgespec.control import MATCH_BUCKETS, match_bucket
from edgespec.datasets import last_per_category, read_prompts, spec_bench_path
from edgespec.drafting import NgramDrafter


def answers(path: Path, per_category: int, max_tokens: int) -> list[dict]:
    if path.exists():
        return json.loads(path.read_text())
    from edgespec.engine import GenerationSettings
    from edgespec.loader import chat_tokens, load
    from edgespec.runtimes.base import RuntimeSettings

    pair = load(None, "none", RuntimeSettings())
    target = pair.engine.target
    template = target.chat_template()
    out = []
    for item in last_per_category(read_prompts(spec_bench_path()), per_category):
        tokens = chat_tokens(target, template, [{"role": "user", "content": item.prompt}])
        gen = pair.engine.generate(tokens, GenerationSettings(max_tokens=max_tokens, draft_max=0)).run()
        out.append({"id": item.id, "category": item.category, "prompt": tokens, "output": gen.tokens})
    pair.close()
    path.write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8, help="draft length replayed")
    parser.add_argument("--answers", type=Path, default=Path("/tmp/edgespec-ngram-answers.json"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    first = [[0, 0] for _ in MATCH_BUCKETS]  # [drafts, first token right]
    later = [[0, 0] for _ in MATCH_BUCKETS]  # [later tokens tried, right]
    for item in answers(args.answers, args.per_category, args.max_tokens):
        seq = item["prompt"] + item["output"]
        drafter = NgramDrafter(n_min=1, n_max=8)
        start = len(item["prompt"]) + 1
        drafter.begin(seq[: start - 1])
        t = start
        while t < len(seq):
            draft = drafter.propose(seq[:t], min(args.k, len(seq) - t))
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
        print(f"| {label} | {first[i][0]} | {f if f is None else f'{f:.2f}'} | {g if g is None else f'{g:.2f}'} |")
    if args.out:
        args.out.write_text(json.dumps({"per_category": args.per_category, "k": args.k, "buckets": rows}, indent=1))


if __name__ == "__main__":
    main()
