"""Flash attention on this CPU: one decoding step at long contexts, with it off and on.

llama-cpp-python's `Llama` runs flash attention off (edgespec's llama.cpp kernels follow it, as the
yardstick does); llama-server's default "auto" turns it on where the backend has it, a CPU
included. Does that explain a gap at long prompts? Two contexts of the default target (2 threads,
4,096 cells), one with flash attention off and one on, each holding the same prompt (edgespec's
own source) cut to 100, 1,000, 2,000 and 3,500 tokens; at each length one single-token step is
timed `--reps` times, rolled back after each, alternating between the two contexts.

    python benchmarks/flash_attn.py --out benchmarks/results/flash_attn.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_run  # noqa: E402

LENGTHS = (100, 1000, 2000, 3500)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    path = models.resolve(models.TARGET)
    source = Path(__file__).resolve().parents[1] / "edgespec"
    text = "".join(p.read_text() for p in sorted(source.rglob("*.py")))
    runtimes = {
        fa: LlamaCppRuntime(path, RuntimeSettings(n_ctx=4096, n_threads=args.threads, flash_attn=fa))
        for fa in ("off", "on")
    }
    rows = []
    try:
        tokens = runtimes["off"].tokenize(text, add_special=False, parse_special=False)
        held = 0
        for length in LENGTHS:
            for rt in runtimes.values():
                rt.eval(tokens[held:length], "last")
            held = length
            times: dict[str, list[float]] = {fa: [] for fa in runtimes}
            for _ in range(args.reps):
                for fa, rt in runtimes.items():
                    t0 = time.perf_counter()
                    rt.eval([tokens[length]], "last")
                    times[fa].append(time.perf_counter() - t0)
                    rt.truncate(length)
            off, on = (1000 * median(times[fa]) for fa in ("off", "on"))
            rows.append({"context": length, "off_ms": off, "on_ms": on, "on_vs_off": on / off})
            print(f"{length:5} tokens: off {off:.1f} ms, on {on:.1f} ms, on/off {on / off:.3f}", flush=True)
    finally:
        for rt in runtimes.values():
            rt.close()
    write_run(args.out, args, rows=rows)


if __name__ == "__main__":
    main()
