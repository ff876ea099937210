"""Hugging Face checkpoint or GGUF → ONNX decoder with past key/values (optimum), optionally int8.

`export_onnx` loads the model in float32 with transformers (a GGUF through transformers' GGUF
loader, which dequantizes it), optionally trims its LM head to a VocabTrim map's kept rows, and has
optimum's ONNX exporter write the "text-generation-with-past" decoder that `runtimes.onnx` runs.
With `int8`, ONNX Runtime's dynamic quantization then stores the MatMul and Gather weights as int8.

What lands in the output folder:
- `model.onnx` (and `model.onnx_data` when the float32 graph passes protobuf's 2 GB limit);
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`, ...) and `config.json`;
- `edgespec_onnx.json`: source, precision, logits width, and the vocabulary's special ids and token
  kinds, read from llama.cpp itself (a vocab-only load of the GGUF source, or of a vocab-only GGUF
  written from the checkpoint's tokenizer as `exporters.gguf` writes it), so the ONNX drafter's
  BOS/EOS/EOT/EOG and control tokens are exactly a llama.cpp model's; transformers' GGUF tokenizer
  leaves control tokens such as `<|im_start|>` as plain vocabulary entries, so they are added back
  as special tokens here;
- with a vocabulary map, `vocab_map.json` (`VocabMap.to_json`). Only the LM head is trimmed: the
  input embedding keeps every row, so the model reads target ids unchanged and `edgespec_onnx.json`
  says `"input_ids": "target"`.

The folder appears atomically: everything is written into a temporary folder beside it, renamed
into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgespec.errors import ExportError, ModelLoadError
from edgespec.exporters.progress import ProgressFactory, progress_bar
from edgespec.fileio import ExportWriteError, describe_write_error
from edgespec.formats.vocabmap import SIDECAR_NAME, VocabMap

__all__ = ["ARCHITECTURES", "OnnxExportReport", "export_onnx"]

ARCHITECTURES = ("llama", "qwen2")
"""Supported `model_type`s (HF config) / `general.architecture`s (GGUF)."""

EXPORT_INFO_NAME = "edgespec_onnx.json"
EXPORT_FORMAT = 1
TASK = "text-generation-with-past"
_MODEL = "model.onnx"
_MODEL_DATA = "model.onnx_data"


@dataclass(frozen=True)
class OnnxExportReport:
    """What `export_onnx` wrote.

    Attributes:
        out_dir: the export folder.
        source: the checkpoint folder or GGUF file it came from.
        source_kind: "hf" or "gguf".
        architecture: "llama" or "qwen2".
        precision: "float32" or "int8".
        n_vocab: input vocabulary (embedding rows).
        n_outputs: logits width (N when trimmed, else n_vocab).
        trimmed: whether the LM head was trimmed to a vocabulary map.
        n_params: parameters of the (trimmed) torch model that was exported.
        size_bytes: bytes of the ONNX model files (model.onnx plus external data).
        seconds: wall time per stage ("load", "export", "quantize") and "total".
    """

    out_dir: Path
    source: Path
    source_kind: str
    architecture: str
    precision: str
    n_vocab: int
    n_outputs: int
    trimmed: bool
    n_params: int
    size_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)


def export_onnx(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    int8: bool = False,
    vocab_map: VocabMap | None = None,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
) -> OnnxExportReport:
    """Export a llama/qwen2 decoder to ONNX for `edgespec.runtimes.onnx.OnnxRuntime`.

    Args:
        source: a Hugging Face checkpoint folder (config.json, weights, tokenizer) or a .gguf file.
        out_dir: the export folder to create.
        int8: quantize the weights to int8 (ONNX Runtime dynamic quantization) instead of float32.
        vocab_map: trim the LM head to `vocab_map.keep` (logits width N); its target_n_vocab must
            equal the model's vocabulary size.
        overwrite: replace an existing non-empty `out_dir` (only once the new export is complete).
        progress: optional factory `progress(total, label)` returning a context manager with
            `update(n)`; advanced by one per stage (load, export, quantize).

    Returns:
        An OnnxExportReport.

    Raises:
        ExportError: missing or unreadable source, unsupported architecture, a vocabulary map made
            for another vocabulary, an occupied out_dir, missing export packages, or a failed export;
            `ExportWriteError` (also an OSError) when the folder cannot be written (a full disk).
    """
    started = time.perf_counter()
    source = Path(source).expanduser()
    out_dir = Path(out_dir).expanduser()
    kind = _check_source(source)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportError(
            f"{out_dir} already exists and is not empty; choose another folder or pass overwrite"
        )
    torch, transformers = _import_export_packages()
    seconds: dict[str, float] = {}
    stages = 3 if int8 else 2
    label = f"ONNX export of {source.name}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export gets a new folder's usual mode
    try:
        with progress_bar(progress, stages, label) as bar:
            t0 = time.perf_counter()
            if kind == "gguf":
                model, tokenizer, vocab_spec, arch = _load_gguf(source, torch, transformers)
            else:
                model, tokenizer, arch = _load_hf(source, torch, transformers)
                vocab_spec = None
            n_vocab = int(model.get_input_embeddings().weight.shape[0])
            if vocab_map is not None:
                if vocab_map.target_n_vocab != n_vocab:
                    raise ExportError(
                        f"the vocabulary map was made for {vocab_map.target_n_vocab} tokens but "
                        f"{source.name} has {n_vocab}"
                    )
                _trim_lm_head(model, vocab_map, torch)
            n_outputs = int(model.get_output_embeddings().weight.shape[0])
            n_params = sum(p.numel() for p in model.parameters())
            seconds["load"] = time.perf_counter() - t0
            bar.update(1)

            t0 = time.perf_counter()
            _export(model, tmp)
            del model
            tokenizer.save_pretrained(tmp)
            if vocab_spec is None:
                vocab_spec = _checkpoint_vocab(source, tmp)
            seconds["export"] = time.perf_counter() - t0
            bar.update(1)

            if int8:
                t0 = time.perf_counter()
                _quantize(tmp)
                seconds["quantize"] = time.perf_counter() - t0
                bar.update(1)

        info = {
            "format": EXPORT_FORMAT,
            "source": source.name,
            "source_kind": kind,
            "architecture": arch,
            "task": TASK,
            "precision": "int8" if int8 else "float32",
            "n_vocab": n_vocab,
            "n_outputs": n_outputs,
            "input_ids": "target",
            "vocab": vocab_spec,
        }
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if vocab_map is not None:
            (tmp / SIDECAR_NAME).write_text(vocab_map.to_json(), encoding="utf-8")
        size = sum((tmp / name).stat().st_size for name in (_MODEL, _MODEL_DATA) if (tmp / name).exists())
        _move_into_place(tmp, out_dir)
    except OSError as exc:  # a full disk, above all: one line, and nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ExportError):
            raise
        raise ExportWriteError(describe_write_error(exc, out_dir)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - started
    return OnnxExportReport(
        out_dir=out_dir,
        source=source,
        source_kind=kind,
        architecture=arch,
        precision="int8" if int8 else "float32",
        n_vocab=n_vocab,
        n_outputs=n_outputs,
        trimmed=vocab_map is not None,
        n_params=n_params,
        size_bytes=size,
        seconds=seconds,
    )


# ------------------------------------------------------------------------------------------- load


def _check_source(source: Path) -> str:
    """The kind of source, "gguf" or "hf", after checking that the files a load needs are there."""
    if not source.exists():
        raise ExportError(f"model not found: {source}")
    if source.is_file():
        with source.open("rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ExportError(f"{source} is neither a GGUF file nor a Hugging Face checkpoint folder")
        try:
            trimmed = VocabMap.from_gguf(source) is not None
        except ModelLoadError as exc:  # a file llama.cpp could not read either
            raise ExportError(str(exc)) from None
        if trimmed:
            # Its ids are trimmed ids, and the map would not survive transformers' GGUF loader.
            raise ExportError(
                f"{source} is a VocabTrim drafter; export the untrimmed drafter with --vocab-trim N instead"
            )
        return "gguf"
    if not (source / "config.json").is_file():
        raise ExportError(f"config.json not found in {source}; is this a Hugging Face checkpoint folder?")
    if not any(source.glob("*.safetensors")) and not any(source.glob("*.bin")):
        raise ExportError(f"no weights (*.safetensors or *.bin) in {source}")
    if not (source / "tokenizer.json").is_file() and not (source / "tokenizer_config.json").is_file():
        raise ExportError(f"no tokenizer (tokenizer.json) in {source}")
    return "hf"


def _import_export_packages() -> tuple[Any, Any]:
    try:
        import onnxruntime.quantization  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
        import torch
        import transformers
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs torch, transformers, optimum-onnx and onnxruntime ({exc}); "
            'install them with pip install "edgespec[export]"'
        ) from exc
    return torch, transformers


def _check_arch(arch: str, source: Path) -> None:
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{source.name} is a {arch or 'unknown'} model; the ONNX exporter supports "
            f"{', '.join(ARCHITECTURES)}"
        )


def _load_hf(source: Path, torch: Any, transformers: Any) -> tuple[Any, Any, str]:
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {source / 'config.json'}: {exc}") from exc
    arch = str(config.get("model_type", ""))
    _check_arch(arch, source)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ExportError(f"transformers cannot load {source}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json)")
    return model.eval(), tokenizer, arch


def _load_gguf(source: Path, torch: Any, transformers: Any) -> tuple[Any, Any, dict[str, Any], str]:
    arch, vocab_spec = _llama_cpp_vocab(source)
    _check_arch(arch, source)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ExportError(f"transformers cannot load the GGUF file {source}: {exc}") from exc
    _restore_special_tokens(tokenizer, vocab_spec)
    vocab_spec["vocab_source"] = "llama.cpp"
    return model.eval(), tokenizer, vocab_spec, arch


def _llama_cpp_vocab(path: Path) -> tuple[str, dict[str, Any]]:
    """Architecture and vocabulary of a GGUF as llama.cpp sees them (vocab-only load, no weights)."""
    import llama_cpp as ll

    from edgespec.formats.gguf import check_gguf
    from edgespec.runtimes.llama_cpp import vocab_info, vocab_only

    try:
        arch = str(check_gguf(path).metadata.get("general.architecture", ""))
        with vocab_only(path) as vocab:
            info = vocab_info(vocab)
            control, user_defined, unused = [], [], []
            for token in range(info.n_vocab):
                attr = int(ll.llama_vocab_get_attr(vocab, token))
                if attr & ll.LLAMA_TOKEN_ATTR_UNUSED:
                    unused.append(token)
                elif attr & ll.LLAMA_TOKEN_ATTR_CONTROL:
                    control.append(token)
                elif attr & ll.LLAMA_TOKEN_ATTR_USER_DEFINED:
                    user_defined.append(token)
            spec = {
                "kind": info.kind,
                "bos": info.bos,
                "eos": info.eos,
                "eot": info.eot,
                "add_bos": info.add_bos,
                "eog": sorted(info.eog),
                "control": control,
                "user_defined": user_defined,
                "unused": unused,
                "texts": {
                    str(t): ll.llama_vocab_get_text(vocab, t).decode("utf-8", "replace")
                    for t in control + user_defined
                },
            }
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    if spec["kind"] != "bpe":
        raise ExportError(
            f"{path.name} has a {spec['kind']} tokenizer; the ONNX exporter supports byte-level BPE"
        )
    return arch, spec


def _checkpoint_vocab(source: Path, scratch: Path) -> dict[str, Any]:
    """The vocabulary of a checkpoint as llama.cpp will see it once converted to GGUF.

    llama.cpp decides some special ids itself (EOT: the first EOT-looking token its hash map
    yields), so the tokenizer is written into a vocab-only GGUF the way `exporters.gguf` writes it
    and read back with llama.cpp. A tokenizer that the GGUF writer refuses gets llama.cpp's rules
    applied here instead, and `vocab_source` in edgespec_onnx.json says so.
    """
    from edgespec.runtimes.onnx import vocab_from_tokenizer

    path = scratch / "vocab-only.gguf"
    try:
        import gguf

        from edgespec.exporters import gguf as gguf_export

        config_path = source / "config.json"
        hparams = gguf_export._hparams(gguf_export._read_json(config_path), config_path)
        vocab = gguf_export._read_vocab(source, hparams.n_vocab)
        writer = gguf.GGUFWriter(path, hparams.arch)
        try:
            gguf_export._add_hparams(writer, hparams, int(gguf.LlamaFileType.ALL_F32), source.name)
            gguf_export._add_tokenizer(writer, source, vocab, hparams.n_vocab)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        _, spec = _llama_cpp_vocab(path)
        spec.pop("texts")
        spec["vocab_source"] = "llama.cpp"
    except (ImportError, ExportError) as exc:
        spec = vocab_from_tokenizer(scratch)
        spec["vocab_source"] = f"tokenizer rules ({exc})"
    finally:
        path.unlink(missing_ok=True)
    return spec


def _restore_special_tokens(tokenizer: Any, vocab_spec: dict[str, Any]) -> None:
    """Mark llama.cpp's control and user-defined tokens as added tokens of the HF tokenizer.

    transformers' GGUF tokenizer keeps only a few of them as added tokens; the others would be
    split as plain text ("<|im_start|>" → "<", "|", "im", ...). Adding a token that is already in the
    vocabulary keeps its id.
    """
    from tokenizers import AddedToken

    texts: dict[str, str] = vocab_spec.pop("texts")
    present = set(tokenizer.get_added_vocab())
    for kind, special in (("control", True), ("user_defined", False)):
        tokens = [
            AddedToken(texts[str(t)], special=special, normalized=False)
            for t in vocab_spec[kind]
            if texts[str(t)] not in present
        ]
        if tokens:
            tokenizer.add_tokens(tokens, special_tokens=special)
    for t in vocab_spec["control"] + vocab_spec["user_defined"]:
        if tokenizer.convert_tokens_to_ids(texts[str(t)]) != t:
            raise ExportError(f"token {t} ({texts[str(t)]!r}) has another id in transformers' GGUF tokenizer")


def _trim_lm_head(model: Any, vocab_map: VocabMap, torch: Any) -> None:
    """Keep only the LM head rows `vocab_map.keep`; the input embedding keeps its full table."""
    head = model.get_output_embeddings()
    keep = torch.as_tensor(vocab_map.keep.astype("int64"))
    with torch.no_grad():
        trimmed = torch.nn.Linear(head.in_features, len(keep), bias=head.bias is not None)
        trimmed.weight.copy_(head.weight.detach()[keep])
        if head.bias is not None:
            trimmed.bias.copy_(head.bias.detach()[keep])
    # Untie first, or a later tie_weights() would put the full embedding back as the head.
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    text_config.tie_word_embeddings = False
    model.set_output_embeddings(trimmed)


# ------------------------------------------------------------------------------------ export


def _export(model: Any, out: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with _quiet():
            onnx_export_from_model(model, out, task=TASK, do_validation=False, device="cpu")
    except Exception as exc:  # optimum and torch.onnx raise many kinds
        raise ExportError(f"optimum could not export the model to ONNX: {exc}") from exc
    if not (out / _MODEL).is_file():
        raise ExportError(f"optimum wrote no {_MODEL} (files: {sorted(p.name for p in out.iterdir())})")


def _quantize(folder: Path) -> None:
    """Replace model.onnx by its dynamic int8 quantization (weights int8, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = folder / _MODEL
    quantized = folder / "model.int8.onnx"
    # Past protobuf's 2 GB limit the weights go to a data file beside the graph, named in it.
    external = (folder / _MODEL_DATA).exists() and (folder / _MODEL_DATA).stat().st_size > (6 << 30)
    try:
        with _quiet():
            quantize_dynamic(
                source,
                quantized,
                weight_type=QuantType.QInt8,
                per_channel=True,
                use_external_data_format=external,
            )
    except Exception as exc:  # onnxruntime raises its own types
        raise ExportError(f"ONNX Runtime could not quantize the model: {exc}") from exc
    source.unlink()
    (folder / _MODEL_DATA).unlink(missing_ok=True)
    os.replace(quantized, source)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' and optimum's warnings during an export (they are about tracing)."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("transformers", "optimum", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
