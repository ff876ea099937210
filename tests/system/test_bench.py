"""`edgespec bench` end to end on the tiny models, its mismatch check, configs and the cost model."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from edgespec.bench import runner as bench
from edgespec.cli.main import cli
from edgespec.costs import Costs
from edgespec.errors import SettingsError

from ..conftest import tiny_model_args
from ..helpers import bench_args


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "the cat sat on the mat and the dog sat on the log", "category": "animals"},
        {"prompt": "once upon a time there was a king and a queen", "category": "stories"},
        {"turns": ["hello world, the", "and then"], "category": "stories"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bench_end_to_end_writes_valid_results(tiny_pair, dataset, tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(
        cli,
        bench_args(
            tiny_pair, dataset, out, "--config", "target-only", "--config", "draft:k=3", "--multi-turn"
        ),
    )
    assert result.exit_code == 0, result.output
    assert "| draft k=3 |" in result.stdout and "### animals" in result.stdout
    assert "| stories | 2 | " in result.stdout  # the by-category speed-up table
    assert "outputs identical to target-only: all" in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in data["configs"]] == ["target-only", "draft k=3"]
    assert len(data["records"]) == 2 * 4  # 2 configurations x (1 + 1 + 2 turns)
    assert all(r["identical_to_target_only"] for r in data["records"])
    assert data["failures"] == [] and data["machine"]["physical_cores"] >= 1
    assert "git_dirty" in data["machine"] and data["machine"]["started"].startswith("20")
    assert len(data["costs"]["t_target"]) == 17 and data["costs"]["t_draft"] > 0
    draft_summary = data["summary"][1]
    assert draft_summary["config"] == "draft k=3" and draft_summary["tau"] >= 1
    assert draft_summary["predicted_speedup"] > 0 and set(data["summary_by_category"]) == {
        "animals",
        "stories",
    }
    assert not list(out.glob(".*"))  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
    shares = (
        draft_summary["share_prompt"] + draft_summary["share_drafting"] + draft_summary["share_verifying"]
    )
    assert 0 < shares <= 1.0 + 1e-9 and draft_summary["share_other"] >= -1e-9
    for png in ("speedup_by_category.png", "tau_vs_k.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    lookup, *simple = data["peers"]
    assert lookup["status"] == "ran" and len(lookup["runs"]) == 3 and lookup["tokens_per_s_median"] > 0
    assert len(simple) == 4  # llama.cpp's ngram-simple, ngram-map-k, ngram-mod and draft-simple
    assert all(
        s["status"] == "skipped" and "not found" in s["notes"] for s in simple
    )  # listed, never dropped
    assert (
        "| llama.cpp llama-speculative-simple --spec-type draft-simple (--spec-draft-n-max 4) | skipped |"
        in (result.stdout)
    )
    assert "| llama.cpp llama-speculative-simple --spec-type ngram-mod | skipped |" in result.stdout


def test_broken_configuration_is_caught(tiny_pair, dataset, tmp_path, monkeypatch):
    """Inject a fault: a verifier that corrupts the target's token whenever there is a draft."""
    import edgespec.engine as engine
    from edgespec.verify import verify_greedy

    def broken(draft, p_logits):
        n, token = verify_greedy(draft, p_logits)
        return (n, (token + 1) % p_logits.shape[1]) if draft else (n, token)

    monkeypatch.setattr(engine, "verify_greedy", broken)
    out = tmp_path / "b"
    result = CliRunner().invoke(
        cli,
        bench_args(
            tiny_pair,
            dataset,
            out,
            "--no-ceiling",
            "--config",
            "ngram:k=2",
            "--config",
            "draft:k=2",
            "--limit",
            "2",
        ),
    )
    assert result.exit_code == 1
    assert "mismatch: draft k=2 differs from target-only" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    data = json.loads((out / "results.json").read_text())
    assert data["failures"] and not all(r["identical_to_target_only"] for r in data["records"])


def test_config_parsing():
    assert bench.BenchConfig.parse("target-only") == bench.TARGET_ONLY
    assert bench.BenchConfig.parse("draft:k=8").k == 8
    ngram = bench.BenchConfig.parse("ngram:k=3,n_max=5")
    assert (ngram.label, ngram.k, ngram.n_max) == ("ngram k=3 n_max=5", 3, 5)
    assert bench.BenchConfig.parse("ngram").k == 4
    for bad, message in [
        ("eagle", "unknown configuration"),
        ("draft:n_max=3", "unknown parameter"),
        ("draft:k=0", "between 1 and 64"),
        ("ngram:n_min=4,n_max=2", "n_min <= n_max"),
    ]:
        with pytest.raises(SettingsError, match=message):
            bench.BenchConfig.parse(bad)


def test_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('configs = ["target-only", "draft:k=2"]\n')
    assert [c.label for c in bench.read_config_file(path)] == ["target-only", "draft k=2"]
    path.write_text("configs = 3\n")
    with pytest.raises(SettingsError, match="expected configs"):
        bench.read_config_file(path)


def test_cost_model_by_hand():
    # T(n) = n ms: batching buys nothing, so speculation can never pay
    linear = Costs(t_target=tuple(n / 1000 for n in range(1, 6)), t_draft=0.0, context_tokens=32)
    assert linear.batch_efficiency(4) == pytest.approx(1.0)
    assert linear.expected_speedup(1.0, 3) == pytest.approx(1.0)
    assert linear.ceiling(0.9) == (0, 1.0)  # k = 0: do not speculate
    # T(n) = 1 ms for any n: all 4 drafts accepted give 5 tokens per step
    flat = Costs(t_target=(0.001,) * 5, t_draft=0.0, context_tokens=32)
    assert flat.expected_speedup(1.0, 4) == pytest.approx(5.0)
    assert flat.expected_speedup(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert flat.ceiling(0.5) == (4, pytest.approx(1.9375))
    # a drafter as costly as the target halves what acceptance buys
    costly = Costs(t_target=(0.001,) * 5, t_draft=0.001, context_tokens=32)
    assert costly.expected_speedup(1.0, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        flat.expected_speedup(1.5, 2)


FAKE_SPECULATIVE_SIMPLE = """#!/bin/sh
# stands in for llama.cpp's binary: checks a few arguments, prints its closing report
case "$*" in
  *" -md "*"--spec-draft-n-max 3"*"--spec-type draft-simple --temp 0"*) ;;
  *" -md "*) echo "bad args: $*" >&2; exit 2;;
  *"--spec-type ngram-simple --temp 0"*) ;;
  *) echo "bad args: $*" >&2; exit 2;;
esac
echo "encoded   20 tokens in    0.100 seconds, speed:  200.000 t/s" >&2
echo "decoded   12 tokens in    0.500 seconds, speed:   24.000 t/s" >&2
echo "accept    = 62.500%" >&2
"""


def test_llama_speculative_simple_peer_runs_and_parses(tmp_path):
    from edgespec.bench import peers

    binary = tmp_path / peers.SPECULATIVE_SIMPLE
    binary.write_text(FAKE_SPECULATIVE_SIMPLE)
    binary.chmod(0o755)
    assert peers.find_speculative_simple(str(tmp_path)) == binary
    assert peers.find_speculative_simple(str(tmp_path / "nowhere")) is None
    prompt = peers.PeerPrompt("p1", "hello", [1, 2], [3])
    common = dict(max_tokens=12, threads=1, n_ctx=256, bin_dir=str(tmp_path))
    report = peers.llama_speculative_simple(
        binary, tmp_path / "t.gguf", tmp_path / "d.gguf", [prompt], k=3, **common
    )
    assert report["status"] == "ran" and report["tokens_per_s_median"] == 24.0
    assert report["runs"][0]["acceptance"] == 0.625 and report["runs"][0]["tokens"] == 12
    failed = peers.llama_speculative_simple(
        binary, tmp_path / "t.gguf", tmp_path / "d.gguf", [prompt], k=5, **common
    )
    assert failed["status"] == "skipped" and "exited with 2" in failed["notes"]
    # llama.cpp's n-gram modes need no draft model and run with their own draft lengths
    ngram = peers.llama_speculative_simple(
        binary, tmp_path / "t.gguf", None, [prompt], k=5, spec_type="ngram-simple", **common
    )
    assert ngram["status"] == "ran" and ngram["name"].endswith("--spec-type ngram-simple")


def test_a_failing_peer_is_reported_not_raised():
    from edgespec.bench import peers

    def boom():
        raise ValueError("could not broadcast\nsecond line")

    report = peers.guarded("some peer", boom)
    assert report["status"] == "failed" and report["notes"] == "ValueError: could not broadcast"


def test_bench_costs_command(tiny_pair):
    args = ["bench", "costs", *tiny_model_args(tiny_pair, ctx=512), "--k-max", "4", "--repeats", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| 5 |" in result.stdout and "batch efficiency" in result.stdout
    assert "| 90% |" in result.stdout and "of a target step" in result.stdout


def test_category_filter(tiny_pair, dataset, tmp_path):
    out = tmp_path / "b"
    args = bench_args(tiny_pair, dataset, out, "--no-ceiling", "--no-peers", "--config", "ngram:k=2")
    result = CliRunner().invoke(cli, [*args, "--category", "stories"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert {r["category"] for r in data["records"]} == {"stories"} and len(data["records"]) == 4
    assert data["settings"]["categories"] == ["stories"]
    result = CliRunner().invoke(cli, [*args, "--category", "poems"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: no category 'poems' in {dataset}; it has: animals, stories")


def test_sampled_bench_records_settings_and_skips_identity(tiny_pair, dataset, tmp_path):
    out = tmp_path / "b"
    configs = ["--config", "draft:k=3", "--config", "draft:k=3,accept=exact", "--config", "ngram"]
    sampling = ["--temperature", "1.0", "--seed", "5"]
    args = bench_args(tiny_pair, dataset, out, "--no-ceiling", *sampling, *configs)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "outputs not compared token by token: sampling at temperature 1" in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["sampling"]["temperature"] == 1.0 and data["sampling"]["accept"] == "rejection"
    labels = [c["label"] for c in data["configs"]]
    assert labels == ["target-only", "draft k=3", "draft k=3 accept=exact", "ngram k=4"]
    assert all(r["identical_to_target_only"] is None for r in data["records"]) and not data["failures"]
    assert all(p["status"] == "skipped" and "greedy only" in p["notes"] for p in data["peers"])


def test_report_merges_runs_split_by_category(tiny_pair, dataset, tmp_path):
    parts = []
    for category in ("animals", "stories"):
        out = tmp_path / category
        args = bench_args(
            tiny_pair, dataset, out, "--no-ceiling", "--config", "ngram:k=2", "--category", category
        )
        assert CliRunner().invoke(cli, args).exit_code == 0
        parts.append(json.loads((out / "results.json").read_text()))
    # a results.json written before sampling existed (no "sampling", no config "accept") still merges
    old = tmp_path / "animals" / "results.json"
    data = json.loads(old.read_text())
    del data["sampling"]
    for config in data["configs"]:
        del config["accept"]
    old.write_text(json.dumps(data))
    merged_dir = tmp_path / "all"
    result = CliRunner().invoke(
        cli,
        ["bench", "report", str(tmp_path / "animals"), str(tmp_path / "stories"), "--out", str(merged_dir)],
    )
    assert result.exit_code == 0, result.output
    assert "### animals" in result.stdout and "### stories" in result.stdout
    merged = json.loads((merged_dir / "results.json").read_text())
    assert len(merged["records"]) == sum(len(p["records"]) for p in parts)
    assert merged["settings"]["categories"] == ["animals", "stories"]
    lookup = merged["peers"][0]
    assert lookup["status"] == "ran" and len(lookup["runs"]) == 3
    assert (merged_dir / "speedup_by_category.png").exists()
    again = CliRunner().invoke(cli, ["bench", "report", str(tmp_path / "animals"), str(tmp_path / "animals")])
    assert again.exit_code == 1 and "is in both" in again.stderr


def test_lookup_peer_records_a_failing_prompt_and_measures_the_rest(
    tiny_pair, dataset, tmp_path, monkeypatch
):
    import llama_cpp

    original = llama_cpp.Llama.generate
    calls = []

    def flaky(self, tokens, **kwargs):
        calls.append(len(tokens))
        if len(calls) == 2:
            raise ValueError("could not broadcast input array")
        yield from original(self, tokens, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "generate", flaky)
    out = tmp_path / "b"
    result = CliRunner().invoke(
        cli, bench_args(tiny_pair, dataset, out, "--no-ceiling", "--config", "ngram:k=2")
    )
    assert result.exit_code == 0, result.output
    lookup = json.loads((out / "results.json").read_text())["peers"][0]
    assert lookup["status"] == "ran" and len(lookup["runs"]) == 3 and lookup["tokens_per_s_median"] > 0
    assert lookup["runs"][1]["error"] == "ValueError: could not broadcast input array"
    assert "failed inside llama-cpp-python on 1/3 prompts" in lookup["notes"]


def test_bench_runs_llama_cpp_plain_decoding_as_the_yardstick(tiny_pair, dataset, tmp_path):
    """`llama.cpp` (llama-cpp-python's create_completion, default context parameters) runs first
    in every round, and speed-ups and the identical-output share are given against it."""
    out = tmp_path / "b"
    result = CliRunner().invoke(
        cli,
        bench_args(
            tiny_pair,
            dataset,
            out,
            "--no-ceiling",
            "--no-peers",
            "--config",
            "llama.cpp",
            "--config",
            "ngram:k=3",
        ),
    )
    assert result.exit_code == 0, result.output
    assert "speed-up over llama.cpp" in result.stdout
    assert "identical to llama.cpp" in result.stdout
    data = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in data["configs"]][:2] == ["llama.cpp", "target-only"]
    labels = [r["config"] for r in data["records"]]
    assert labels[0] == "llama.cpp" and labels.count("llama.cpp") == 3
    plain = [r for r in data["records"] if r["config"] == "llama.cpp"]
    assert all(r["tokens_per_second"] > 0 and r["t_prompt"] > 0 and r["n_generated"] >= 1 for r in plain)
    assert all(r["identical_to_llama_cpp"] is True for r in plain)
    # tokens are counted alike: where target-only gave llama.cpp's text, it gave as many tokens
    counts = {(r["prompt_id"], r["repeat"]): r["n_generated"] for r in plain}
    same_text = [
        r for r in data["records"] if r["config"] == "target-only" and r["identical_to_llama_cpp"] is True
    ]
    assert same_text and all(r["n_generated"] == counts[r["prompt_id"], r["repeat"]] for r in same_text)
    others = [r for r in data["records"] if r["config"] != "llama.cpp"]
    assert all(isinstance(r["identical_to_llama_cpp"], bool) for r in others)
    summary = {s["config"]: s for s in data["summary"]}
    assert summary["llama.cpp"]["speedup_geomean"] == pytest.approx(1.0)
    assert 0 <= summary["target-only"]["identical_to_llama_cpp"] <= 1


def test_bench_fails_on_a_mismatch_only_under_exact(tiny_pair, dataset, tmp_path, monkeypatch):
    """Under llama.cpp's kernels (the distribution guarantee) a greedy difference from
    target-only is reported, not a failure; under `exact` it is a failure."""
    import edgespec.engine as engine
    from edgespec.verify import verify_greedy

    def broken(draft, p_logits):
        n, token = verify_greedy(draft, p_logits)
        return (n, (token + 1) % p_logits.shape[1]) if draft else (n, token)

    monkeypatch.setattr(engine, "verify_greedy", broken)
    args = ["--no-ceiling", "--no-peers", "--config", "draft:k=2", "--limit", "2"]
    fast = CliRunner().invoke(cli, bench_args(tiny_pair, dataset, tmp_path / "f", *args, "--kernels", "fast"))
    assert fast.exit_code == 0, fast.output
    assert "guarantee distribution" in fast.stdout and "outputs differing from target-only: " in fast.stdout
    data = json.loads((tmp_path / "f" / "results.json").read_text())
    assert data["failures"] == [] and not all(r["identical_to_target_only"] for r in data["records"])
    exact = CliRunner().invoke(cli, bench_args(tiny_pair, dataset, tmp_path / "e", *args))
    assert exact.exit_code == 1


def test_llama_cpp_takes_no_parameters():
    assert bench.BenchConfig.parse("llama.cpp") == bench.YARDSTICK
    with pytest.raises(SettingsError, match="takes no parameters"):
        bench.BenchConfig.parse("llama.cpp:k=3")
