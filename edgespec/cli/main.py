"""The `edgespec` command line.

Every failure a user can cause ends as one line on stderr, `error: ...`, and a non-zero exit code:
1 for a problem with models or input, 2 for a bad option, 130 for Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgespec import __version__
from edgespec.cli.common import (
    SAMPLING_KEYS,
    SEED,
    constraint_options,
    engine_options,
    format_sources,
    format_stats,
    one_constraint,
    open_engine,
    progress,
    read_prompt,
    sampling_options,
    sampling_settings,
    tune_progress,
)
from edgespec.defaults import DRAFT_MAX, K_LIMIT, N_CTX
from edgespec.errors import EdgespecError, one_line

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class _StderrLines(logging.Handler):
    """Warnings from the "edgespec" logger (e.g. GPU offload asked for on a machine without a
    GPU) as plain lines on stderr, like every other note of the command line."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


def _warnings_to_stderr() -> None:
    logger = logging.getLogger("edgespec")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines(logging.WARNING))


class _OneLineErrors(click.Group):
    """A click group whose errors are one line (`error: ...`) instead of usage text or a traceback."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _warnings_to_stderr()
        try:
            result = super().main(args, prog_name or "edgespec", complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except EdgespecError as exc:
            click.echo(f"error: {one_line(str(exc))}", err=True)
            code = EXIT_ERROR
        except (KeyboardInterrupt, click.Abort):
            click.echo("\ninterrupted", err=True)
            code = EXIT_INTERRUPTED
        except Exception as exc:
            # A bug, or a failure inside a library: still one line for the user; the traceback on request.
            if os.environ.get("EDGESPEC_DEBUG"):
                raise
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc} (set EDGESPEC_DEBUG=1 for details)", err=True
            )
            code = EXIT_ERROR
        else:
            code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="edgespec")
def cli() -> None:
    """edgespec: speculative decoding for local LLMs, with output identical to the target alone.

    \b
    Examples:
      edgespec run "Write a Python function that returns the n-th Fibonacci number."
      edgespec run --draft ngram --stats "Rewrite this code with type hints: ..."
      echo "Explain KV caches" | edgespec run --json
      edgespec models
    """


@cli.command()
@click.argument("prompt", required=False)
@engine_options
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Most tokens to generate.",
)
@sampling_options
@click.option(
    "--seed",
    type=SEED,
    default=None,
    help="Sampling seed: the same seed and settings give the same output (default: a fresh one, "
    "shown by --json).",
)
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@constraint_options
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--raw", is_flag=True, help="Send the prompt as it is, without the chat template.")
@click.option("--stats", is_flag=True, help="Print speed and drafting statistics to stderr.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object (text, token ids, stats) instead of streaming text.",
)
@click.pass_context
def run(
    ctx_obj: click.Context,
    prompt: str | None,
    max_tokens: int,
    seed: int | None,
    stop: tuple[str, ...],
    json_schema: Any,
    regex: Any,
    grammar: Any,
    system: str | None,
    raw: bool,
    stats: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Generate an answer to PROMPT (or standard input), streaming it as tokens are accepted.

    At temperature 0 (the default) the output is token for token what the target model alone
    produces with greedy decoding; above 0 it is distributed exactly as the target's own samples.

    \b
    Examples:
      edgespec run "Write a Python function that returns the n-th Fibonacci number."
      edgespec run --draft none --stats "Explain recursion"     # target only, for comparison
      edgespec run --target my.gguf --draft ngram --raw "def quicksort(xs):"
      edgespec run --temperature 0.8 --top-p 0.95 --seed 7 "Write a haiku about caches"
      edgespec run --profile auto --stats "Add type hints: ..."   # measured placement and drafting
      edgespec run --json-schema person.json "Extract the person: Ada Lovelace, born 1815"
    """
    constraint = one_constraint(json_schema, regex, grammar)
    text = read_prompt(prompt)
    if not text.strip():  # before loading gigabytes of models (tokenizing checks it too)
        raise EdgespecError("the prompt is empty")
    sampling = sampling_settings(flags)
    with open_engine(ctx_obj, flags) as engine:
        tokens = engine.tokenize(text, raw=raw, system=system)
        out = sys.stdout
        with engine.stream(
            tokens,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
            grammar=constraint,
            **{key: getattr(sampling, key) for key in SAMPLING_KEYS},
        ) as stream:
            for chunk in stream:
                if chunk.text and not as_json:
                    out.write(chunk.text)
                    out.flush()
        result = stream.result
        assert result is not None
        if as_json:
            record = {
                "text": result.text,
                "tokens": result.tokens,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "target": str(engine.target_path),
                "draft": engine.draft,
                "draft_max": engine.draft_max,
                "seed": result.seed,
                "sampling": sampling.to_dict(),
                "stats": result.stats.to_dict(),
            }
            click.echo(json.dumps(record, ensure_ascii=False))
        elif not result.text.endswith("\n"):
            out.write("\n")
        if stats:
            click.echo(format_stats(result.stats, engine.draft_label), err=True)
            if result.sources is not None:
                click.echo(format_sources(result.sources), err=True)


def _bench_runtimes(
    target: str,
    draft: str,
    threads: int | None,
    ctx: int,
    kernels: str,
    need_draft: bool,
    draft_threads: int | None = None,
    draft_gpu_layers: int = 0,
):
    """Load the pair through the same builder as `run` (compatibility check included)."""
    from edgespec.load.builder import EngineSpec, build

    spec = EngineSpec(
        target,
        draft if need_draft else "none",
        n_ctx=ctx,
        threads=threads,
        draft_threads=draft_threads,
        draft_gpu_layers=draft_gpu_layers,
        kernels=kernels,
        flash_attn="off",  # as llama-cpp-python's Llama, which the bench compares with
    )
    pair = build(spec, progress=progress).pair
    return pair, pair.engine.target, pair.draft_runtime


def _bench_auto_profile(target_rt: Any, draft_rt: Any, draft: str) -> Any:
    """The tuned profile that `auto` configurations follow: the placement detected for this
    machine, tuned with the bench's loaded models on first use."""
    from edgespec.load.builder import ensure_tuned, resolve_model_path, resolve_profile
    from edgespec.placement.hardware import detect_hardware

    hw = detect_hardware()
    draft_path = (
        draft_rt.path
        if draft_rt is not None
        else None
        if draft in ("none", "ngram")  # no draft model: not a name to look up
        else resolve_model_path(draft, "draft", progress)
    )
    base, reasons = resolve_profile("auto", hw, target_rt.path, draft_path)
    click.echo(f"auto: profile {base.name} ({'; '.join(reasons)})", err=True)
    profile = ensure_tuned(
        base,
        hw,
        target_rt,
        draft_rt,
        tune_progress=tune_progress,
        on_note=lambda line: click.echo(line, err=True),
    )
    costs = profile.costs
    drafters = ", ".join(profile.speculation.drafters) or "none"
    measured = costs.measured if costs is not None else "no costs needed"
    click.echo(f"auto: tuned profile {profile.source} (drafters: {drafters}; measured {measured})", err=True)
    return profile


_BENCH_MODEL_OPTIONS = [
    click.option(
        "--target", envvar="EDGESPEC_TARGET", default="default", show_default=True, help="Target GGUF."
    ),
    click.option(
        "--draft", envvar="EDGESPEC_DRAFT", default="default", show_default=True, help="Draft GGUF."
    ),
    click.option("--threads", envvar="EDGESPEC_THREADS", type=click.IntRange(min=1), default=None),
    click.option(
        "--draft-threads",
        type=click.IntRange(min=1),
        default=None,
        help="CPU threads for the draft model (default: --threads).",
    ),
    click.option(
        "--draft-gpu-layers",
        type=int,
        default=0,
        show_default=True,
        help="Draft layers on a GPU (-1 = all; llama.cpp's peer gets the same -ngld).",
    ),
    click.option("--ctx", "ctx_size", type=click.IntRange(min=64), default=N_CTX, show_default=True),
    click.option("--kernels", type=click.Choice(["exact", "fast"]), default="fast", show_default=True),
]


def _model_options(func: Any) -> Any:
    for option in reversed(_BENCH_MODEL_OPTIONS):
        func = option(func)
    return func


@cli.group(invoke_without_command=True)
@click.option(
    "--dataset",
    default="spec-bench",
    show_default=True,
    help="'spec-bench' (the shared Spec-Bench prompts) or a JSONL file with prompt/turns fields.",
)
@click.option(
    "--per-category", type=click.IntRange(min=1), default=None, help="First N prompts per category."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N prompts overall.")
@click.option(
    "--category",
    "categories",
    multiple=True,
    help="Only prompts of this category (repeatable); default: every category.",
)
@click.option("--multi-turn", is_flag=True, help="Generate every turn of multi-turn prompts.")
@click.option(
    "--config",
    "config_specs",
    multiple=True,
    help="Configuration, repeatable: target-only, draft[:k=N], ngram[:k=N,n_min=N,n_max=N], auto "
    "(the tuned --profile auto).",
)
@click.option(
    "--drafter",
    "named_drafters",
    multiple=True,
    metavar="NAME=PATH",
    help="A further draft GGUF (repeatable), used by configurations draft:model=NAME.",
)
@click.option(
    "--config-file",
    type=click.Path(dir_okay=False),
    default=None,
    help='TOML file with configs = ["target-only", "draft:k=4", ...].',
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option(
    "--ceiling/--no-ceiling",
    default=True,
    show_default=True,
    help="Measure the cost curve first and report each configuration's predicted speed-up.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Write results.json and PNG plots (with the plot extra) here.",
)
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="Also run llama-cpp-python's prompt lookup and llama.cpp's llama-speculative-simple.",
)
@click.option(
    "--peer-k",
    type=click.IntRange(1, K_LIMIT),
    default=DRAFT_MAX,
    show_default=True,
    help="Draft length for peers.",
)
@click.option(
    "--llama-cpp-bin",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding llama.cpp's llama-speculative-simple (default: search PATH).",
)
@sampling_options
@click.option(
    "--seed",
    type=SEED,
    default=0,
    show_default=True,
    help="Base sampling seed; every configuration gets the same seed for the same prompt.",
)
@_model_options
@click.pass_context
def bench(
    ctx: click.Context,
    dataset: str,
    per_category: int | None,
    limit: int | None,
    categories: tuple[str, ...],
    multi_turn: bool,
    config_specs: tuple[str, ...],
    named_drafters: tuple[str, ...],
    config_file: str | None,
    max_tokens: int,
    repeat: int,
    warmup: int,
    ceiling: bool,
    out: str | None,
    peers: bool,
    peer_k: int,
    llama_cpp_bin: str | None,
    target: str,
    draft: str,
    threads: int | None,
    draft_threads: int | None,
    draft_gpu_layers: int,
    ctx_size: int,
    kernels: str,
    seed: int,
    **sampling_flags: Any,
) -> None:
    """Measure configurations side by side on the same loaded models; fail on any output difference.

    Greedy by default, where every output must equal target-only's. With --temperature above 0
    every configuration samples with the same settings and seeds, and outputs are not compared.

    \b
    Examples:
      edgespec bench --dataset spec-bench --per-category 2 --config target-only \\
          --config draft:k=4 --config ngram --max-tokens 64 --out /tmp/b
      edgespec bench --per-category 2 --temperature 1.0 --config draft:k=4 \\
          --config draft:k=4,accept=exact
      edgespec bench --per-category 2 --drafter t32k=drafter-32k.gguf --config draft:k=4 \\
          --config draft:k=4,model=t32k
    """
    if ctx.invoked_subcommand is not None:
        return
    sampling = sampling_settings(sampling_flags)
    from edgespec import costs as cost_model
    from edgespec.bench import runner as harness

    configs = [harness.BenchConfig.parse(s) for s in config_specs]
    if config_file:
        configs += harness.read_config_file(config_file)
    if not configs:
        configs = [
            harness.TARGET_ONLY,
            harness.BenchConfig.parse("draft:k=4"),
            harness.BenchConfig.parse("ngram"),
        ]
    prompts = _bench_prompts(dataset, categories, per_category, limit)
    drafter_paths = _drafter_paths(named_drafters)
    harness.check_drafter_names(configs, drafter_paths)  # before the (slow) model loads
    need_draft = any(c.drafter in ("draft", "auto") and c.model is None for c in configs) or ceiling
    pair, target_rt, draft_rt = _bench_runtimes(
        target, draft, threads, ctx_size, kernels, need_draft, draft_threads, draft_gpu_layers
    )
    extra_drafts: dict[str, Any] = {}
    try:
        from edgespec.load.builder import load_draft_model

        auto_profile = None
        if any(c.drafter == "auto" for c in configs):
            auto_profile = _bench_auto_profile(target_rt, draft_rt, draft)

        for name, path in drafter_paths.items():
            extra_drafts[name] = load_draft_model(path, target_rt, target_rt.settings)
        n_runs = (
            len(prompts) * repeat * (len(configs) + (0 if any(c.drafter == "none" for c in configs) else 1))
        )
        if multi_turn:
            n_runs = sum(len(p.turns) for p in prompts) * repeat * len(configs)
        machine = harness.machine_info()  # now, so that it names the code that measured
        measured = None
        if ceiling:
            click.echo("measuring the cost curve ...", err=True)
            context = target_rt.tokenize(prompts[0].prompt * 4, add_special=True, parse_special=False)[:256]
            measured = cost_model.measure(target_rt, draft_rt, context)
        with click.progressbar(length=n_runs, label="bench", file=sys.stderr) as bar:
            result = harness.run(
                target_rt,
                draft_rt,
                prompts,
                configs,
                max_tokens=max_tokens,
                repeat=repeat,
                warmup=warmup,
                multi_turn=multi_turn,
                sampling=sampling,
                seed=seed,
                on_run=lambda: bar.update(1),
                drafts=extra_drafts,
                auto_profile=auto_profile,
            )
        result.costs = measured
        if peers and not sampling.greedy:
            from edgespec.bench.peers import all_skipped

            result.peers = all_skipped(peer_k, "peers run greedy only; not comparable when sampling")
        elif peers:
            click.echo("running peers ...", err=True)
            result.peers = _run_peers(target_rt, draft_rt, prompts, result, max_tokens, peer_k, llama_cpp_bin)
        click.echo(harness.markdown(result))
        if out:
            settings = {
                "dataset": dataset,
                "per_category": per_category,
                "limit": limit,
                "categories": list(categories) or None,
                "multi_turn": multi_turn,
                "max_tokens": max_tokens,
                "repeat": repeat,
                "warmup": warmup,
                "kernels": kernels,
                "threads": target_rt.settings.n_threads,
                "target": str(target_rt.path),
                "draft": str(draft_rt.path) if draft_rt else None,
                "draft_threads": draft_rt.settings.n_threads if draft_rt else None,
                "draft_gpu_layers": draft_rt.settings.gpu_layers if draft_rt else None,
                "drafters": {name: str(rt.path) for name, rt in extra_drafts.items()},
                "auto_profile": auto_profile.to_dict() if auto_profile is not None else None,
            }
            _write_bench_outputs(result, Path(out), settings, machine)
    finally:
        for rt in extra_drafts.values():
            rt.close()
        pair.close()
    if result.failures:
        for failure in result.failures:
            click.echo(f"mismatch: {failure}", err=True)
        raise EdgespecError(f"{len(result.failures)} speculative outputs differ from target-only")


def _bench_prompts(
    dataset: str, categories: tuple[str, ...], per_category: int | None, limit: int | None
) -> list[Any]:
    """The prompts `edgespec bench` runs: the dataset, cut to the categories and counts asked for."""
    from edgespec.bench.datasets import first_per_category, read_prompts, spec_bench_path

    prompts = read_prompts(spec_bench_path() if dataset == "spec-bench" else dataset)
    if categories:
        known = sorted({p.category for p in prompts})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise EdgespecError(f"no category {unknown[0]!r} in {dataset}; it has: {', '.join(known)}")
        prompts = [p for p in prompts if p.category in categories]
    if per_category:
        prompts = first_per_category(prompts, per_category)
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise EdgespecError(f"no prompts in {dataset}")
    return prompts


def _drafter_paths(named_drafters: tuple[str, ...]) -> dict[str, str]:
    """`--drafter NAME=PATH` values as {name: path}, each name a word given once."""
    drafter_paths: dict[str, str] = {}
    for value in named_drafters:
        name, sep, path = value.partition("=")
        if not sep or not name or not path or not name.replace("_", "").replace(".", "").isalnum():
            raise click.BadParameter(
                f"expected NAME=PATH with a word NAME, got {value!r}", param_hint="--drafter"
            )
        if name in drafter_paths:
            raise click.BadParameter(f"drafter name {name!r} given twice", param_hint="--drafter")
        drafter_paths[name] = path
    return drafter_paths


def _write_bench_outputs(
    result: Any, out: Path, settings: dict[str, Any], machine: dict[str, Any] | None = None
) -> None:
    from edgespec.bench import runner as harness

    path = harness.write_results(result, out, settings, machine)
    click.echo(f"\nwrote {path}", err=True)
    try:
        from edgespec.bench.plots import write_plots

        for png in write_plots(result, out):
            click.echo(f"wrote {png}", err=True)
    except ModuleNotFoundError:
        click.echo('plots skipped: matplotlib is not installed (pip install "edgespec[plot]")', err=True)


@bench.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Write merged results.json and plots here."
)
def bench_report(results: tuple[str, ...], out: str | None) -> None:
    """Print the tables of one or more bench runs (DIR or results.json each) as one result.

    Use it when a long measurement is split into runs, e.g. one per group of categories: every
    prompt is still compared within its own run.

    \b
    Example:
      edgespec bench report bench-out/part1 bench-out/part2 --out bench-out/all
    """
    from edgespec.bench import runner as harness

    result, settings = harness.merge_results([Path(r) for r in results])
    click.echo(harness.markdown(result))
    if out:
        _write_bench_outputs(result, Path(out), settings)
    if result.failures:
        raise EdgespecError(f"{len(result.failures)} speculative outputs differ from target-only")


def _run_peers(
    target_rt: Any, draft_rt: Any, prompts: Any, result: Any, max_tokens: int, k: int, bin_dir: str | None
) -> list[dict[str, Any]]:
    from edgespec.bench import peers
    from edgespec.chat import render_chat
    from edgespec.runtimes.llama_cpp import default_threads

    template = target_rt.chat_template()
    peer_prompts = []
    for item in prompts:
        text = render_chat(template, [{"role": "user", "content": item.prompt}])
        tokens = target_rt.tokenize(text, add_special=False, parse_special=True)
        peer_prompts.append(peers.PeerPrompt(item.id, text, tokens, result.references.get(item.id, [])))
    threads = target_rt.settings.n_threads or default_threads()
    binary = peers.find_speculative_simple(bin_dir)
    return [
        peers.guarded(
            peers.lookup_name(k),
            lambda: peers.llama_cpp_python_lookup(
                target_rt.path,
                peer_prompts,
                max_tokens=max_tokens,
                k=k,
                threads=threads,
                eog=target_rt.vocab.eog,
            ),
        ),
        *(
            peers.guarded(
                peers.simple_name(k, spec_type),
                lambda spec_type=spec_type: peers.llama_speculative_simple(
                    binary,
                    target_rt.path,
                    draft_rt.path if draft_rt else None,
                    peer_prompts,
                    max_tokens=max_tokens,
                    k=k,
                    threads=threads,
                    n_ctx=target_rt.n_ctx,
                    bin_dir=bin_dir,
                    gpu_layers=target_rt.settings.gpu_layers,
                    draft_gpu_layers=draft_rt.settings.gpu_layers if draft_rt else 0,
                    spec_type=spec_type,
                ),
            )
            for spec_type in peers.SPEC_TYPES
        ),
    ]


@bench.command("costs")
@_model_options
@click.option("--k-max", type=click.IntRange(1, K_LIMIT), default=16, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def bench_costs(
    target: str,
    draft: str,
    threads: int | None,
    draft_threads: int | None,
    draft_gpu_layers: int,
    ctx_size: int,
    kernels: str,
    k_max: int,
    repeats: int,
) -> None:
    """Measure draft and verification costs here and print the speed-up speculation could reach."""
    from edgespec import costs as cost_model
    from edgespec.bench import runner as harness
    from edgespec.bench.datasets import read_prompts, spec_bench_path

    pair, target_rt, draft_rt = _bench_runtimes(
        target, draft, threads, ctx_size, kernels, True, draft_threads, draft_gpu_layers
    )
    try:
        text = read_prompts(spec_bench_path())[0].prompt * 4
        context = target_rt.tokenize(text, add_special=True, parse_special=False)[:256]
        measured = cost_model.measure(target_rt, draft_rt, context, k_max=k_max, repeats=repeats)
    finally:
        pair.close()
    click.echo(harness.costs_markdown(measured))


from edgespec.cli.models import models, pull  # noqa: E402  (registers `edgespec models`, `pull`)

cli.add_command(models)
cli.add_command(pull)

from edgespec.cli.export import export  # noqa: E402  (registers `edgespec export …`)

cli.add_command(export)

from edgespec.cli.profile import profile  # noqa: E402  (registers `edgespec profile …`)

cli.add_command(profile)


from edgespec.cli.chat import chat  # noqa: E402  (registers `edgespec chat`)

cli.add_command(chat)


from edgespec.cli.serve import serve  # noqa: E402  (registers `edgespec serve`)

cli.add_command(serve)


def main() -> None:
    cli.main(prog_name="edgespec")


if __name__ == "__main__":
    main()
