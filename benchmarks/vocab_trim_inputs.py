"""What does reading stand-ins for dropped tokens cost a VocabTrim drafter in acceptance?

A trimmed GGUF has N vocabulary rows, so a context token outside the kept set is fed as its
longest kept prefix (see edgespec/formats/vocabmap.py). To separate that cost from the cost of the
smaller head, this runs three drafters for the default target on the same prompts, greedy, k = 4:

* untrimmed: the default drafter;
* head only: the default drafter reading every token exactly, with its logits cut to the trimmed
  file's kept rows (what an ONNX `--vocab-trim` export does; no speed gain here, it computes the
  full head and then discards rows);
* trimmed GGUF: the trimmed file itself (smaller head, stand-in inputs).

The difference in acceptance between "head only" and "trimmed GGUF" is what the stand-ins cost.
All outputs are checked against target-only, as `edgespec bench` does.

    python benchmarks/vocab_trim_inputs.py TRIMMED.gguf [--per-category 1] [--max-tokens 128]
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


class HeadOnlyTrim:
    """A runtime that reads target ids and returns only the kept columns of each logits row."""

    inputs_in_target_ids = True

    def __init__(self, runtime, vocab_map) -> None:
        from dataclasses import replace

        self._rt = runtime
        self.vocab_map = vocab_map
        self.path = runtime.path
        self.settings = runtime.settings
        self.vocab = replace(runtime.vocab, n_vocab=vocab_map.n_keep)
        self.n_input_vocab = runtime.vocab.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._rt.n_ctx

    @property
    def n_past(self) -> int:
        return self._rt.n_past

    def eval(self, tokens: Sequence[int], logits: str = "last") -> np.ndarray:
        return self._rt.eval(tokens, logits)[:, self.vocab_map.keep]

    def truncate(self, n: int) -> None:
        self._rt.truncate(n)

    def close(self) -> None:
        self._rt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trimmed", type=Path)
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from edgespec.bench import runner as bench
    from edgespec.bench.datasets import first_per_category, read_prompts, spec_bench_path
    from edgespec.load.builder import load, load_draft_model
    from edgespec.runtimes.base import RuntimeSettings

    settings = RuntimeSettings(n_ctx=4096, n_threads=args.threads)
    pair = load(None, "default", settings)
    target, full = pair.engine.target, pair.draft_runtime
    trimmed = load_draft_model(args.trimmed, target, settings)
    second_full = load_draft_model("default", target, settings)  # its own cache for the wrapper
    head_only = HeadOnlyTrim(second_full, trimmed.vocab_map)
    prompts = first_per_category(read_prompts(spec_bench_path()), args.per_category)
    configs = [
        bench.TARGET_ONLY,
        bench.BenchConfig.parse("draft:k=4"),
        bench.BenchConfig.parse("draft:k=4,model=head_only"),
        bench.BenchConfig.parse("draft:k=4,model=trimmed"),
    ]
    result = bench.run(
        target,
        full,
        prompts,
        configs,
        max_tokens=args.max_tokens,
        drafts={"head_only": head_only, "trimmed": trimmed},
    )
    print(bench.markdown(result, by_category=False))
    if result.failures:
        raise SystemExit(f"{len(result.failures)} outputs differ from target-only")
    if args.out:
        write_json(
            args.out,
            {
                "trimmed": str(args.trimmed),
                "n_keep": trimmed.vocab_map.n_keep,
                "machine": machine(),
                "summary": bench.summarize(result),
            },
        )
    for rt in (trimmed, second_full):
        rt.close()
    pair.close()


if __name__ == "__main__":
    main()
