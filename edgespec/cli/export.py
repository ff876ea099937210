"""`edgespec export …`: prepare models offline (VocabTrim, GGUF and ONNX conversion)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgespec.defaults import N_CTX
from edgespec.errors import ExportError


def _bar(total: int, label: str) -> Any:
    """The exporters' progress factory: (total, label) → a progress bar on stderr."""
    return click.progressbar(length=total, label=label, file=sys.stderr)


@click.group()
def export() -> None:
    """Prepare models offline: trim a drafter's vocabulary, convert to GGUF or ONNX.

    \b
    Examples:
      edgespec export vocab-trim --keep 32768 --out drafter-32k.gguf
      edgespec export gguf --model ./Qwen2.5-0.5B --out qwen-0.5b.gguf --quant Q8_0
      edgespec export onnx --model drafter.gguf --out ./drafter-onnx --int8
    """


def _calibration_options(func: Any) -> Any:
    """Where token frequencies come from: shared by vocab-trim and onnx --vocab-trim."""
    options = [
        click.option(
            "--target",
            default="default",
            show_default=True,
            help="Target GGUF whose text sets the frequencies.",
        ),
        click.option(
            "--calibration",
            default="spec-bench",
            show_default=True,
            help="Prompts (JSONL, or spec-bench) the target answers to measure token frequencies.",
        ),
        click.option(
            "--calibration-per-category",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            help="With spec-bench: the target answers the last N prompts of each category.",
        ),
        click.option(
            "--holdout",
            type=click.IntRange(min=0),
            default=5,
            show_default=True,
            help="With spec-bench: the first N prompts of each category are never used (benchmark them).",
        ),
        click.option(
            "--generate",
            type=click.IntRange(min=1),
            default=128,
            show_default=True,
            help="M, tokens per prompt.",
        ),
        click.option(
            "--corpus",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Count tokens of these text files instead of generating (repeatable).",
        ),
        click.option(
            "--counts",
            "counts_in",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Reuse frequencies saved by --save-counts (same target) instead of calibrating.",
        ),
        click.option(
            "--save-counts",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Save the measured frequencies (.npz) for later --counts.",
        ),
        click.option("--threads", type=click.IntRange(min=1), default=None),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass(frozen=True)
class _Calibration:
    counts: Any  # int64 array per target id
    source: str  # how the frequencies were obtained
    target_path: Path
    target_sha256: str


def _model_progress(model: Any) -> Any:
    return _bar(model.size, f"preparing {model.description} (first use)")


def _calibrate(options: dict[str, Any]) -> _Calibration:
    """Token frequencies of the target's text, measured, counted in a corpus, or loaded."""
    import numpy as np

    from edgespec.bench.datasets import held_out, last_per_category, read_prompts, spec_bench_path
    from edgespec.chat import prompt_tokens
    from edgespec.exporters import vocab_trim as vt
    from edgespec.load.builder import EngineSpec, build, resolve_model_path

    target_path = resolve_model_path(options["target"], "target", _model_progress)
    counts_in: Path | None = options["counts_in"]
    if counts_in is not None:
        try:
            with np.load(counts_in) as data:
                counts, source, sha = data["counts"], str(data["source"]), str(data["target_sha256"])
        except (OSError, ValueError, KeyError) as exc:
            raise ExportError(f"cannot read saved frequencies {counts_in}: {exc}") from None
        actual = vt.sha256_file(target_path) if target_path.is_file() else ""
        if sha != actual:
            raise ExportError(f"{counts_in} was measured on another target than {target_path}")
        return _Calibration(counts, source, target_path, sha)

    corpus: tuple[Path, ...] = options["corpus"]
    generate: int = options["generate"]
    calibration: str = options["calibration"]
    per_category: int = options["calibration_per_category"]
    holdout: int = options["holdout"]
    spec = EngineSpec(target_path, "none", n_ctx=N_CTX, threads=options["threads"], flash_attn="off")
    pair = build(spec).pair
    try:
        engine = pair.engine
        if corpus:
            texts = []
            for path in corpus:
                try:
                    texts.append(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError) as exc:
                    raise ExportError(f"cannot read corpus {path}: {exc}") from None
            counts = vt.count_corpus(engine.target, texts)
            source = f"corpus: {', '.join(p.name for p in corpus)} ({int(counts.sum())} tokens)"
        else:
            if calibration == "spec-bench":
                # Every prompt after the held-out ones is read; the last few are also answered.
                readable = held_out(read_prompts(spec_bench_path()), holdout)
                prompts = last_per_category(readable, per_category)
                label = f"spec-bench after the first {holdout} per category, last {per_category} answered"
            else:
                readable = prompts = read_prompts(calibration)
                label = Path(calibration).name
            if not prompts:
                raise ExportError(f"no calibration prompts in {calibration}")
            token_lists = [prompt_tokens(engine.target, p.prompt) for p in prompts]
            limit = engine.target.n_ctx - generate
            token_lists = [t for t in token_lists if len(t) <= limit]
            if not token_lists:
                raise ExportError(f"every calibration prompt is longer than {limit} tokens")
            with _bar(len(token_lists), f"calibrating on {len(token_lists)} prompts") as bar:
                counts = vt.count_generated(engine, token_lists, generate, progress=bar.update)
            generated = int(counts.sum())
            # The prompts' own tokens count too: the trimmed vocabulary is also what the drafter
            # reads, and they are a larger sample of the same kind of text.
            for item in readable:
                for turn in item.turns:
                    counts += vt.count_prompt(prompt_tokens(engine.target, turn), len(counts))
            source = (
                f"generated: {label}, {len(token_lists)} prompts x {generate} tokens, "
                f"{len(readable)} prompts read "
                f"({generated} generated + {int(counts.sum()) - generated} prompt tokens)"
            )
    finally:
        pair.close()
    result = _Calibration(counts, source, target_path, vt.sha256_file(target_path))
    save: Path | None = options["save_counts"]
    if save is not None:
        from edgespec.fileio import atomic_path, write_errors

        with write_errors(save), atomic_path(save, suffix=".npz") as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, counts=counts, source=source, target_sha256=result.target_sha256)
    return result


@export.command("vocab-trim")
@click.option("--draft", default="default", show_default=True, help="Drafter GGUF to trim.")
@click.option(
    "--keep",
    "keeps",
    type=click.IntRange(min=1),
    multiple=True,
    required=True,
    help="N, tokens to keep (repeatable: one calibration, one file per N).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output GGUF; with several --keep, a directory for DRAFT-trimN.gguf files.",
)
@_calibration_options
def vocab_trim(draft: str, keeps: tuple[int, ...], out: Path, **options: Any) -> None:
    """Prune the drafter's LM head to the N tokens the target uses most (VocabTrim).

    Frequencies come from the target's own greedy answers to calibration prompts (prompt tokens
    count too: the trimmed vocabulary is also what the drafter reads), or from --corpus text.
    Special, control and byte tokens are always kept. The output loads in llama.cpp, and edgespec
    maps its ids back to the target's, so speculative output stays identical to target-only.

    \b
    Examples:
      edgespec export vocab-trim --keep 32768 --out drafter-32k.gguf
      edgespec export vocab-trim --keep 16384 --keep 32768 --out trims/ --save-counts freq.npz
      edgespec export vocab-trim --keep 8192 --counts freq.npz --out drafter-8k.gguf
      edgespec export vocab-trim --draft d.gguf --target t.gguf --keep 8192 --corpus notes.txt --out d-8k.gguf
    """
    from edgespec.exporters import vocab_trim as vt
    from edgespec.formats.vocabmap import VocabMap
    from edgespec.load.builder import resolve_model_path

    draft_path = resolve_model_path(draft, "draft", _model_progress)
    # Fail before the (long) calibration, not after it.
    if not draft_path.is_file():
        raise ExportError(f"drafter not found: {draft_path}")
    if VocabMap.from_gguf(draft_path) is not None:
        raise ExportError(f"{draft_path} is already trimmed; trim the original drafter instead")
    if len(set(keeps)) != len(keeps):
        raise click.BadParameter("each --keep value once", param_hint="--keep")
    if len(keeps) > 1 and out.suffix == ".gguf":
        raise click.BadParameter("with several --keep values, --out is a directory", param_hint="--out")
    outputs = [out] if len(keeps) == 1 else [out / f"{draft_path.stem}-trim{n}.gguf" for n in keeps]
    for path in outputs:
        if path.resolve() == draft_path.resolve():
            raise click.BadParameter("the output would overwrite the drafter", param_hint="--out")

    cal = _calibrate(options)
    for n_keep, path in zip(keeps, outputs, strict=True):
        report = vt.trim_gguf(
            draft_path,
            path,
            cal.counts,
            n_keep,
            target_sha256=cal.target_sha256,
            frequency_source=cal.source,
            progress=_bar,
        )
        click.echo(
            f"{report.out}: {report.n_keep} of {report.n_source_vocab} tokens "
            f"({report.n_forced} always kept), {report.out_bytes / 2**20:.1f} MiB "
            f"(was {report.source_bytes / 2**20:.1f} MiB); kept tokens cover "
            f"{report.coverage:.1%} of the calibration text"
        )


@export.command("gguf")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="GGUF file to write.")
@click.option(
    "--quant",
    default="F16",
    show_default=True,
    help="F16, BF16, F32, or a llama.cpp type made by its own quantizer (Q8_0, Q4_K_M, ...).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for the quantizer.")
def export_gguf(model_dir: Path, out: Path, quant: str, threads: int | None) -> None:
    """Convert a Llama or Qwen2 checkpoint to GGUF, then quantize it with llama.cpp.

    Tensor names, hyperparameters, the byte-level BPE tokenizer and the chat template are carried
    over; quantized types come from llama.cpp's own quantizer (llama_model_quantize).

    \b
    Examples:
      edgespec export gguf --model ./Qwen2.5-Coder-0.5B-Instruct --out qwen-0.5b-f16.gguf
      edgespec export gguf --model ./Qwen2.5-Coder-0.5B-Instruct --out qwen-0.5b-q8.gguf --quant Q8_0
    """
    from edgespec.exporters.gguf import export_gguf as convert

    report = convert(model_dir, out, quant, progress=_bar, threads=threads)
    click.echo(
        f"{report.path}: {report.architecture}, {report.quant}, {report.n_params / 1e6:.1f}M parameters, "
        f"{report.n_vocab} tokens, {report.file_size / 2**20:.1f} MiB, in {report.seconds:.1f} s"
    )


@export.command("onnx")
@click.option(
    "--model",
    "source",
    required=True,
    type=click.Path(path_type=Path),
    help="A Llama/Qwen2 Hugging Face checkpoint folder or a GGUF file (dequantized to float32).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--int8", is_flag=True, help="Dynamic int8 weight quantization with onnxruntime's quantizer.")
@click.option(
    "--vocab-trim",
    "n_keep",
    type=click.IntRange(min=1),
    default=None,
    help="Keep only N LM-head rows, chosen from the --target's text as in vocab-trim.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty --out folder.")
@_calibration_options
def export_onnx(
    source: Path, out: Path, int8: bool, n_keep: int | None, overwrite: bool, **options: Any
) -> None:
    """Export a decoder with past key/values to ONNX through optimum, for ONNX Runtime.

    The folder (model.onnx, tokenizer, edgespec_onnx.json, and vocab_map.json when trimmed) is a
    drafter for `edgespec run --draft FOLDER`, running on the best execution provider onnxruntime
    offers (CUDA, DirectML, CoreML, CPU). A trimmed ONNX drafter keeps its full input embedding,
    so it reads target ids; only its output rows are trimmed.

    \b
    Examples:
      edgespec export onnx --model drafter.gguf --out drafter-onnx --int8
      edgespec export onnx --model drafter.gguf --out drafter-onnx-32k --vocab-trim 32768 --counts freq.npz
    """
    from edgespec.exporters.onnx import export_onnx as convert

    vocab_map = None
    if n_keep is not None:
        from edgespec.exporters import vocab_trim as vt

        if not source.exists():
            raise ExportError(f"model not found: {source}")
        cal = _calibrate(options)
        vocab_map = vt.vocab_map_for(
            cal.target_path, cal.counts, n_keep, target_sha256=cal.target_sha256, frequency_source=cal.source
        )
    report = convert(source, out, int8=int8, vocab_map=vocab_map, overwrite=overwrite, progress=_bar)
    trimmed = f", {report.n_outputs} of {report.n_vocab} output rows" if report.trimmed else ""
    click.echo(
        f"{report.out_dir}: {report.architecture}, {report.precision}{trimmed}, "
        f"{report.size_bytes / 2**20:.1f} MiB, in {report.seconds.get('total', 0.0):.1f} s"
    )
