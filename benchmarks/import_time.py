"""Start-up cost of edgespec at several commits, interleaved: `import edgespec`, `from edgespec
import Engine` and `edgespec --help`, each in a fresh interpreter.

Each commit's edgespec/, runtimes/ and exporters/ are unpacked (git archive) into a folder laid
out as installed, and every command runs from inside it, so the commits are compared on the same
interpreter and packages. Rounds alternate between the commits; the medians are printed.

    python benchmarks/import_time.py --rev 784ce32 --rev HEAD --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKS = {
    "import edgespec": "import edgespec",
    "from edgespec import Engine": "from edgespec import Engine",
    # the console script's module moved (edgespec.cli -> edgespec.cli.main); try both
    "edgespec --help": (
        "import sys\n"
        "try:\n    from edgespec.cli.main import cli\n"
        "except ImportError:\n    from edgespec.cli import cli\n"
        "sys.argv = ['edgespec', '--help']\ncli(standalone_mode=False)"
    ),
}


def unpack(rev: str, into: Path) -> Path:
    """The commit's package as installed: edgespec/ with runtimes/ and exporters/ inside."""
    command = ["git", "archive", rev, "edgespec", "runtimes", "exporters"]
    data = subprocess.run(command, cwd=ROOT, capture_output=True, check=True).stdout
    src = into / "src"
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(src, filter="data")
    pkg = into / "pkg"
    pkg.mkdir()
    (src / "edgespec").rename(pkg / "edgespec")
    for name in ("runtimes", "exporters"):
        (src / name).rename(pkg / "edgespec" / name)
    return pkg


def seconds(code: str, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", required=True, help="a commit (repeat for several)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: unpack(rev, Path(tmp) / str(i)) for i, rev in enumerate(args.rev)}
        times: dict[tuple[str, str], list[float]] = {(r, c): [] for r in trees for c in CHECKS}
        for _ in range(args.rounds):
            for rev, tree in trees.items():
                for label, code in CHECKS.items():
                    times[rev, label].append(seconds(code, tree))
    print(f"median of {args.rounds} fresh interpreters, seconds (rounds interleaved)")
    print("| check | " + " | ".join(args.rev) + " |")
    print("|---|" + "---|" * len(args.rev))
    for label in CHECKS:
        row = [f"{statistics.median(times[rev, label]):.3f}" for rev in args.rev]
        print(f"| `{label}` | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
