"""The model drafter beside other sequences: do the slots draft in one batch, and what does it buy?

Issue 20 asks that the model drafter draft for all its sequences in one batch. `Slots` links the
target's batcher to the draft model's (`Batcher.link`): a verification pass waits for a sequence
still drafting, and a draft pass for the sequences of the latest verification pass. This runs one
`edgespec.Engine(parallel=4)` with the default draft model at a fixed k (no profile, llama.cpp's
kernels, flash attention off) and streams 4 Spec-Bench first turns at once, greedy, with the two
batchers linked and unlinked (the link undone on the same engine), and without drafts (draft_max
0, the target alone), interleaved, rep by rep.

For each: aggregate tokens/s within the window in which all 4 stream; the verification passes and
draft passes of the whole run (prompts included); the mean sequences per pass of each. Nothing else
may run meanwhile.

    python benchmarks/batch_drafts.py --out benchmarks/results/batch_drafts.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_steps import run_streams  # noqa: E402
from common import median, write_run  # noqa: E402
from concurrency import short_prompts  # noqa: E402

STREAMS = 4


def linked(engine: Any, on: bool) -> None:
    """Link the engine's target batcher to its draft batcher, or undo the link."""
    target, draft = engine._slots.target, engine._slots.draft
    if on:
        target.link(draft)
    else:
        target._drafts = draft._verifies = None


def passes_in(batcher: Any, since: int) -> list[Any]:
    return list(batcher.stats.history)[since - batcher.stats.passes :] if batcher.stats.passes > since else []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--draft-max", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import edgespec

    prompts = short_prompts(200, STREAMS * args.reps)
    rows = []
    with edgespec.Engine(
        draft_max=args.draft_max,
        parallel=STREAMS,
        threads=args.threads,
        kernels="fast",
        flash_attn="off",
        n_ctx=1024,
    ) as engine:
        target, draft = engine._slots.target, engine._slots.draft
        assert draft is not None, "the default draft model did not load"
        for rep in range(args.reps):
            for on, k in ((True, None), (False, None), (True, 0)):
                linked(engine, on)
                t0, d0 = target.stats.passes, draft.stats.passes
                chosen = prompts[rep * STREAMS :][:STREAMS]
                r = run_streams(engine, chosen, args.max_tokens, **({} if k is None else {"draft_max": k}))
                tp, dp = passes_in(target, t0), passes_in(draft, d0)
                tokens = args.max_tokens * STREAMS  # at most; per-token figures use the streamed count
                row = {
                    "rep": rep,
                    "batchers": "no drafts" if k == 0 else "linked" if on else "unlinked",
                    "tokens_per_s": r["tokens_per_s"],
                    "verify_passes": len(tp),
                    "draft_passes": len(dp),
                    "verify_seqs_mean": sum(p.seqs for p in tp) / max(1, len(tp)),
                    "draft_seqs_mean": sum(p.seqs for p in dp) / max(1, len(dp)),
                    "window_tokens": r["tokens"],
                    "asked_tokens": tokens,
                }
                rows.append(row)
                print(
                    f"rep {rep} {row['batchers']:9}: {row['tokens_per_s']:.2f} tok/s, verify passes"
                    f" {row['verify_passes']} ({row['verify_seqs_mean']:.2f} seqs), draft passes"
                    f" {row['draft_passes']} ({row['draft_seqs_mean']:.2f} seqs)",
                    flush=True,
                )
    summary = {}
    for name in ("linked", "unlinked", "no drafts"):
        mine = [r for r in rows if r["batchers"] == name]
        summary[name] = {
            k: median([r[k] for r in mine])
            for k in ("tokens_per_s", "verify_passes", "draft_passes", "verify_seqs_mean", "draft_seqs_mean")
        }
    print("\n| batchers | tokens/s | verification passes | seqs per pass | draft passes | seqs per pass |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['tokens_per_s']:.2f} | {s['verify_passes']:.0f} | {s['verify_seqs_mean']:.2f} |"
            f" {s['draft_passes']:.0f} | {s['draft_seqs_mean']:.2f} |"
        )
    write_run(args.out, args, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
