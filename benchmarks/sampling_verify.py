"""How long does one speculative-sampling verification step take on the full vocabulary?

Takes real logits: the default target's k + 1 rows for a draft of k tokens, and the default
drafter's k rows, on the first coding prompt of Spec-Bench (Qwen2.5's 151,936-token vocabulary).
Then times, for several sampling settings, what the engine does per step outside the models:

* verify (worst case): `verify_rejection` with q = p, so every draft token is accepted, all
  k + 1 target rows go through the whole pipeline and the bonus token is sampled;
* verify (real draft): the same with the drafter's own q and a draft sampled from it, so rows
  after the first rejection are not processed (the engine reads them lazily) but a residual
  distribution is built and sampled;
* draft token: the drafter's per-token cost of turning one row into q and sampling from it.

Median and 90th percentile over --repeats runs, in milliseconds, on one thread (numpy).

    python benchmarks/sampling_verify.py [--k 8] [--repeats 50] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, spec_bench_prompts, write_json  # noqa: E402

SETTINGS = {
    "T=1.0": dict(temperature=1.0),
    "T=0.7, top-p 0.95": dict(temperature=0.7, top_p=0.95),
    "T=0.8, top-k 40": dict(temperature=0.8, top_k=40),
    "T=1.0, min-p 0.05": dict(temperature=1.0, min_p=0.05),
    "T=0.8, top-k 40, top-p 0.95, min-p 0.05, penalties": dict(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, presence_penalty=0.2
    ),
}


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec.chat import prompt_tokens
    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime
    from edgespec.sampling import LazyDists, LogitsProcessor, SamplingSettings, TokenSampler
    from edgespec.verify import verify_rejection

    k = args.k
    text = next(p["prompt"] for p in spec_bench_prompts(1, 13) if p["category"] == "coding")
    settings = RuntimeSettings(n_ctx=2048)
    target = LlamaCppRuntime(models.resolve(models.TARGET), settings)
    draft_rt = LlamaCppRuntime(models.resolve(models.DRAFT), settings)
    prompt = prompt_tokens(target, text)
    # the draft: the drafter's greedy continuation; its rows are q's logits
    d_rows = [draft_rt.eval(prompt, logits="last")[0].copy()]
    draft = [int(d_rows[0].argmax())]
    for _ in range(k - 1):
        d_rows.append(draft_rt.eval([draft[-1]], logits="last")[0].copy())
        draft.append(int(d_rows[-1].argmax()))
    target.eval(prompt[:-1], logits="none")
    p_rows = target.eval([prompt[-1], *draft], logits="all").copy()  # (k + 1, n_vocab)
    n_vocab = target.vocab.n_vocab
    d_rows_arr = np.stack(d_rows)[:, :n_vocab]
    recents = [prompt[-64:] + draft[:i] for i in range(k + 1)]
    rows = []
    for name, kwargs in SETTINGS.items():
        s = SamplingSettings(**kwargs)
        processor = LogitsProcessor(s, n_vocab)
        rng = np.random.default_rng(0)

        # q = p: every draft token is kept; the draft is tokens p can produce
        p_fixed = processor.distributions(p_rows, recents)
        tokens = [d.sample(0.5) for d in p_fixed[:k]]

        def verify_worst(processor=processor, rng=rng, tokens=tokens, q=p_fixed[:k]):
            p = LazyDists(processor, p_rows, recents)  # as the engine does
            return verify_rejection(tokens, q, p, rng.random(k + 1), n_vocab)

        sampler = TokenSampler(s, rng)
        q = [sampler.pick(row, recents[i]) for i, row in enumerate(d_rows_arr)]
        q_dists = list(sampler.dists)

        def verify_real(processor=processor, rng=rng, q=q, q_dists=q_dists):
            p = LazyDists(processor, p_rows, recents)
            return verify_rejection(q, q_dists, p, rng.random(k + 1), n_vocab)

        def draft_token(sampler=sampler):
            sampler.reset()
            return sampler.pick(d_rows_arr[0], recents[0])

        worst = timed(verify_worst, args.repeats)
        real = timed(verify_real, args.repeats)
        per_draft = timed(draft_token, args.repeats)
        rows.append(
            {
                "settings": name,
                "verify_worst_ms": worst,
                "verify_real_ms": real,
                "draft_token_ms": per_draft,
            }
        )
    print(f"k = {k}, vocabulary {n_vocab}, {args.repeats} repeats; median / p90 in ms\n")
    print("| settings | verify, all accepted | verify, real draft | per draft token |")
    print("|---|---|---|---|")
    for r in rows:
        keys = ("verify_worst_ms", "verify_real_ms", "draft_token_ms")
        cells = [f"{r[key][0]:.2f} / {r[key][1]:.2f}" for key in keys]
        print(f"| {r['settings']} | " + " | ".join(cells) + " |")
    if args.out:
        data = {"k": k, "n_vocab": n_vocab, "repeats": args.repeats, "machine": machine(), "rows": rows}
        write_json(args.out, data)
    target.close()
    draft_rt.close()


if __name__ == "__main__":
    main()
