"""Does reusing a cached prompt prefix give the same next-token logits as one fresh pass?

    python benchmarks/prefix_reuse_exactness.py --out benchmarks/results/prefix_reuse_exactness.json

For a chat prompt of n tokens on the default target (exact kernels): the last row's logits of one
pass over the whole prompt, against those after keeping the first `keep` tokens of that same pass
in the cache and evaluating the rest (keep = 1 … n-1), and after tokens were decoded one at a time
(as the previous answer of a chat turn is) and then kept. Prints which splits give bit-identical
logits and the largest difference otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

PROMPT = (
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and type hints. "
    "Then explain how it works, step by step, for a beginner who has never seen recursion before, and "
    "give two examples."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec.chat import prompt_tokens
    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    rt = LlamaCppRuntime(models.resolve(models.TARGET), RuntimeSettings(n_ctx=2048, kernels="exact"))
    tokens = prompt_tokens(rt, PROMPT)
    n = len(tokens)
    rt.truncate(0)
    fresh = rt.eval(tokens, logits="last")[0].copy()

    def last_row_after(keep: int, decode_from: int | None = None) -> np.ndarray:
        rt.truncate(0)
        if decode_from is None:
            rt.eval(tokens, logits="none")  # the whole prompt in one pass, then keep a prefix of it
        else:
            rt.eval(tokens[:decode_from], logits="none")
            for token in tokens[decode_from:keep]:  # one at a time, as decoding does
                rt.eval([token], logits="last")
        rt.truncate(keep)
        return rt.eval(tokens[keep:], logits="last")[0].copy()

    rows = []
    for keep in range(1, n):
        diff = float(np.abs(last_row_after(keep) - fresh).max())
        rows.append({"keep": keep, "rest": n - keep, "decoded": 0, "max_abs_diff": diff})
    decode_from = (n // 2) // 4 * 4
    for keep in range(decode_from + 4, n, 4):
        diff = float(np.abs(last_row_after(keep, decode_from) - fresh).max())
        rows.append({"keep": keep, "rest": n - keep, "decoded": keep - decode_from, "max_abs_diff": diff})
    rt.close()

    same = [r["keep"] for r in rows if r["max_abs_diff"] == 0 and not r["decoded"]]
    prefill = [r for r in rows if not r["decoded"]]
    decoded = [r for r in rows if r["decoded"]]
    print(f"prompt of {n} tokens; a prefix of one pass, kept: identical logits for keep in {same}")
    print(f"otherwise max |diff| up to {max(r['max_abs_diff'] for r in prefill):.3f}")
    for r in decoded:
        print(
            f"tokens {decode_from}..{r['keep'] - 1} decoded one at a time, then kept: "
            f"max |diff| {r['max_abs_diff']:.3f}"
        )
    if args.out:
        write_json(args.out, {"machine": machine(), "n_prompt": n, "rows": rows})


if __name__ == "__main__":
    main()
