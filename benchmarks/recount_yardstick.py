"""Recount llama.cpp's tokens in a yardstick results file written before the counting fix.

    python benchmarks/recount_yardstick.py benchmarks/results/yardstick_code.json

Before commit "yardstick: count llama.cpp's tokens from the usage", `LlamaCppPlain` counted the
calls of llama-cpp-python's stopping criteria: one per sampled token, the end-of-generation token
included, plus one after its loop. Its decoding rate therefore credited llama.cpp with one token
more than it gave (two where the answer ended with an end-of-generation token) over the same
measured time, a bias of up to 2/n on an n-token answer.

The time was measured correctly, so the rate can be recounted exactly: the time after the first
token is (calls - 1) / rate, and the tokens are those of edgespec's target-only run of the same
prompt, whose text was identical to llama.cpp's (checked for every prompt; a prompt where it was
not is left out and named). The file is rewritten in place (through a temporary file), each
recounted record marked `"recounted": true`, and the tables are printed again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from yardstick import markdown, summarize  # noqa: E402

REFERENCES = ("edgespec target-only", "edgespec exact target-only")


def recount(data: dict) -> list[str]:
    """Fix the llama.cpp records of `data` in place; return the prompts left out."""
    records = data["records"]
    max_tokens = data["max_tokens"]
    # the token count of a target-only run whose text was llama.cpp's (the first such run wins)
    reference: dict[tuple[str, str], int] = {}
    for r in records:
        if r["config"] in REFERENCES and r.get("identical_to_llama_cpp"):
            reference.setdefault((r["set"], r["prompt_id"]), r["n_generated"])
    left_out = []
    for r in records:
        if r["config"] != "llama.cpp" or r.get("recounted"):
            continue
        n = reference.get((r["set"], r["prompt_id"]))
        if n is None:
            left_out.append(f"{r['set']}/{r['prompt_id']}")
            r["tokens_per_second"] = None
            continue
        # the callback's calls: the tokens, the end-of-generation token if one ended it, one more
        calls = n + (1 if n < max_tokens else 0) + 1
        assert r["n_generated"] == n + 1, (r, n)  # what the old script stored, for either ending
        decode_time = (calls - 1) / r["tokens_per_second"]
        r["tokens_per_second"] = (n - 1) / decode_time if n > 1 else 0.0
        r["n_generated"] = n
        r["recounted"] = True
    return left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    args = parser.parse_args()
    data = json.loads(args.file.read_text())
    left_out = recount(data)
    if left_out:
        print(f"left out (no identical target-only run): {', '.join(left_out)}", file=sys.stderr)
    kept = [
        r for r in data["records"] if r.get("tokens_per_second") is not None or r["config"] != "llama.cpp"
    ]
    data["by_set"] = summarize(kept, "set")
    data["by_category"] = summarize([r for r in kept if r["set"] == "spec-bench"], "category")
    print(markdown(data["by_set"]))
    if data["by_category"]:
        print()
        print(markdown(data["by_category"]))
    write_json(args.file, data)


if __name__ == "__main__":
    main()
