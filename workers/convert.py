"""Hugging Face checkpoint → GGUF conversion, and GGUF → smaller GGUF quantization.

Both run in a child process (``python -m workers.convert``) that reports progress as JSON lines,
for three reasons: ``llama_model_quantize`` is one C call that cannot be interrupted, so killing
its process is the only clean cancel; the converter's torch and transformers stay out of the
worker's memory once the job is over; and a crash in either cannot take the worker down.

Guarantees, for both functions:

* the result is written under a temporary name beside ``out_path`` and renamed into place only
  once it is complete and flushed to disk; after a failure or a cancel no file is left behind;
* ``progress(done, total, stage)`` is called from the caller's thread, in bytes, with ``done``
  never going down and the last call having ``done == total``;
* ``should_cancel()`` is polled from the caller's thread about twice a second; when it returns
  true the child is killed within a second and :class:`ConversionCancelled` is raised;
* bad input raises :class:`ConversionError` with a message fit to show an operator.

One job per ``out_path`` at a time: the temporary name is fixed (``.NAME.partial``), so a job
that is redelivered after its worker died replaces the partial file the dead run left.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gguf import LlamaFileType

from workers.gguf import GGUFError, check_magic

ProgressCallback = Callable[[int, int, str], None]
CancelCheck = Callable[[], bool]

STAGE_CONVERTING = "converting"  # bytes of the GGUF written so far
STAGE_QUANTIZING = "quantizing"  # bytes of the source tensors quantized so far

SUPPORTED_OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")

# The quantization types offered, as llama.cpp's llama_ftype values (gguf's LlamaFileType mirrors include/llama.h).
QUANT_FTYPES: dict[str, int] = {
    name: int(LlamaFileType[f"MOSTLY_{name}"])
    for name in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                 "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16")
}
SUPPORTED_QUANT_TYPES: tuple[str, ...] = tuple(QUANT_FTYPES)

CANCEL_POLL_SECONDS = 0.5
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_STDERR_TAIL_LINES = 40


class ConversionError(Exception):
    """The conversion or quantization could not be done; the message says why, for an operator."""


class ConversionCancelled(Exception):
    """``should_cancel`` asked to stop; nothing was written."""


def convert_checkpoint(
    *,
    source_dir: Path,
    out_path: Path,
    outtype: str,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    model_name: str | None = None,
) -> Path:
    """Convert the Hugging Face safetensors checkpoint in ``source_dir`` to a GGUF at ``out_path``.

    ``outtype`` is one of :data:`SUPPORTED_OUTTYPES`. ``model_name`` becomes the GGUF's
    ``general.name`` (the directory name when omitted). Progress is reported in bytes written,
    under the stage :data:`STAGE_CONVERTING`. Returns ``out_path``.
    """
    source_dir, out_path = Path(source_dir).absolute(), Path(out_path).absolute()
    if outtype not in SUPPORTED_OUTTYPES:
        raise ConversionError(f"unknown output type {outtype!r}; choose one of {', '.join(SUPPORTED_OUTTYPES)}")
    _check_checkpoint(source_dir)
    _check_destination(out_path)
    args = ["convert", "--source-dir", str(source_dir), "--outtype", outtype]
    if model_name:
        args += ["--model-name", model_name]
    return _produce(args, out_path=out_path, progress=progress, should_cancel=should_cancel)


def quantize(
    *,
    source: Path,
    out_path: Path,
    qtype: str,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    threads: int | None = None,
) -> Path:
    """Quantize the GGUF ``source`` to ``qtype`` (one of :data:`SUPPORTED_QUANT_TYPES`) at ``out_path``.

    The source must be unquantized (F32/F16/BF16); requantizing an already quantized model
    is refused, because it compounds the rounding errors. Progress is reported in bytes of
    source tensors done, under the stage :data:`STAGE_QUANTIZING`. ``threads`` defaults to
    every core. Returns ``out_path``.
    """
    source, out_path = Path(source).absolute(), Path(out_path).absolute()
    qtype_key = qtype.upper()
    if qtype_key not in QUANT_FTYPES:
        raise ConversionError(f"unknown quantization type {qtype!r}; choose one of {', '.join(SUPPORTED_QUANT_TYPES)}")
    if not source.is_file():
        raise ConversionError(f"source model {source} does not exist")
    with source.open("rb") as f:
        try:
            check_magic(f.read(8))
        except GGUFError as exc:
            raise ConversionError(f"{source.name}: {exc}") from None
    _check_destination(out_path)
    args = ["quantize", "--source", str(source), "--qtype", qtype_key, "--threads", str(threads or 0)]
    return _produce(args, out_path=out_path, progress=progress, should_cancel=should_cancel)


# --- checks made before any child starts --------------------------------------------------------

def _check_checkpoint(source_dir: Path) -> None:
    if not source_dir.is_dir():
        raise ConversionError(f"checkpoint directory {source_dir} does not exist")
    config_path = source_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{source_dir.name} has no config.json, so it is not a Hugging Face checkpoint")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversionError(f"config.json in {source_dir.name} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ConversionError(f"config.json in {source_dir.name} names no architecture")
    if not any(source_dir.glob("*.safetensors")):
        found = "only PyTorch .bin weights" if any(source_dir.glob("*.bin")) else "no weights"
        raise ConversionError(f"{source_dir.name} has {found}; only safetensors checkpoints are converted")
    if not (source_dir / "tokenizer.json").is_file() and not (source_dir / "tokenizer.model").is_file():
        raise ConversionError(f"{source_dir.name} has no tokenizer (tokenizer.json or tokenizer.model)")


def _check_destination(out_path: Path) -> None:
    if out_path.exists():
        raise ConversionError(f"{out_path.name} already exists; pick another name")
    if not out_path.parent.is_dir():
        raise ConversionError(f"output directory {out_path.parent} does not exist")


def partial_path(out_path: Path) -> Path:
    """Where the file is written until it is complete."""
    return out_path.with_name(f".{out_path.name}.partial")


# --- the parent side: run the child, relay progress, cancel, rename -----------------------------

def _produce(args: list[str], *, out_path: Path, progress: ProgressCallback | None,
             should_cancel: CancelCheck | None) -> Path:
    tmp_path = partial_path(out_path)
    tmp_path.unlink(missing_ok=True)
    try:
        _run_child([*args, "--out", str(tmp_path)], progress=progress, should_cancel=should_cancel)
        if not tmp_path.is_file():
            raise ConversionError("the converter finished without writing a file")
        with tmp_path.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out_path


def _run_child(args: list[str], *, progress: ProgressCallback | None, should_cancel: CancelCheck | None) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-m", "workers.convert", *args], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    events: queue.Queue[str | None] = queue.Queue()
    stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
    readers = [threading.Thread(target=_read_lines, args=(child.stdout, events.put, True), daemon=True),
               threading.Thread(target=_read_lines, args=(child.stderr, stderr_tail.append, False), daemon=True)]
    for reader in readers:
        reader.start()
    error: str | None = None
    finished = False
    last_done = -1
    next_cancel_check = 0.0
    try:
        while True:
            now = time.monotonic()
            if should_cancel is not None and now >= next_cancel_check:
                next_cancel_check = now + CANCEL_POLL_SECONDS
                if should_cancel():
                    raise ConversionCancelled("cancelled")
            try:
                line = events.get(timeout=CANCEL_POLL_SECONDS)
            except queue.Empty:
                continue
            if line is None:  # the child closed its stdout: it has exited or is about to
                break
            event = _parse_event(line)
            if event is None:
                continue
            if event["event"] == "progress" and progress is not None:
                done, total = int(event["done"]), int(event["total"])
                if done > last_done:
                    last_done = done
                    progress(done, total, str(event["stage"]))
            elif event["event"] == "error":
                error = str(event["message"])
            elif event["event"] == "done":
                finished = True
        returncode = child.wait()
        for reader in readers:
            reader.join(timeout=5)
        if should_cancel is not None and should_cancel():  # asked while finishing: still no file
            raise ConversionCancelled("cancelled")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if error is not None:
        raise ConversionError(error)
    if returncode != 0 or not finished:
        tail = " | ".join(line for line in stderr_tail if line.strip())[-1500:]
        raise ConversionError(f"the converter process exited with status {returncode}: {tail or 'no output'}")


def _read_lines(stream: IO[bytes], sink: Callable[[Any], None], end_with_none: bool) -> None:
    for raw in stream:
        sink(raw.decode("utf-8", "replace").rstrip("\n"))
    stream.close()
    if end_with_none:
        sink(None)


def _parse_event(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


# --- the child side -----------------------------------------------------------------------------

class _Reporter:
    """Writes progress events to the parent, and exits if the parent has gone away."""

    def __init__(self, channel: IO[str]) -> None:
        self._channel = channel
        self._parent = os.getppid()

    def send(self, event: str, **fields: Any) -> None:
        if os.getppid() != self._parent:  # the worker died; nobody will rename or remove our file
            os._exit(3)
        self._channel.write(json.dumps({"event": event, **fields}) + "\n")
        self._channel.flush()

    def progress(self, done: int, total: int, stage: str) -> None:
        self.send("progress", done=done, total=total, stage=stage)


class _InputError(Exception):
    """A problem with the input, already phrased for an operator."""


class _ReportedTensor:
    """Wraps a tensor the GGUF writer is about to write, to count its bytes once written."""

    def __init__(self, tensor: Any, on_written: Callable[[int], None]) -> None:
        self._tensor, self._on_written = tensor, on_written
        self.nbytes = tensor.nbytes

    def tofile(self, fout: Any) -> None:
        self._tensor.tofile(fout)
        self._on_written(self.nbytes)


def _child_convert(source_dir: Path, out: Path, outtype: str, model_name: str | None, reporter: _Reporter) -> None:
    import logging

    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(source_dir, False)
        architecture = get_model_architecture(hparams, ModelType.TEXT)
        try:
            model_class = get_model_class(architecture, mmproj=False)
        except NotImplementedError:
            raise _InputError(f"architecture {architecture} is not supported by the converter") from None
        model = model_class(source_dir, ftypes[outtype], out, model_name=model_name)
        model.prepare_tensors()
        model.prepare_metadata(vocab_only=False)
        writer = model.gguf_writer
        if len(writer.tensors) != 1:
            raise _InputError("the converter planned a split GGUF, which is not supported here")
        total = sum(info.nbytes for info in writer.tensors[0].values())
        if total == 0:
            raise _InputError(f"no tensors of {source_dir.name} could be converted")
        written = 0

        def on_written(nbytes: int) -> None:
            nonlocal written
            written += nbytes
            reporter.progress(written, total, STAGE_CONVERTING)

        for info in writer.tensors[0].values():
            info.tensor = _ReportedTensor(info.tensor, on_written)
        reporter.progress(0, total, STAGE_CONVERTING)
        writer.write_header_to_file(path=out)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()


# "[  12/ 291]             blk.0.attn_q.weight - [ 4096,  4096, ...], type =    f16, "
_QUANTIZE_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-")


def _child_quantize(source: Path, out: Path, qtype: str, threads: int, reporter: _Reporter) -> None:
    import ctypes

    import llama_cpp
    from gguf import GGUFReader

    sizes = {tensor.name: int(tensor.n_bytes) for tensor in GGUFReader(source).tensors}
    total = sum(sizes.values())
    done = 0
    current: str | None = None
    failures: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        nonlocal done, current
        message = text.decode("utf-8", "replace")
        sys.stderr.write(message)
        if match := _QUANTIZE_TENSOR_LINE.match(message):
            current = match.group(1)
        elif message.startswith("size =") and current is not None:
            done += sizes.get(current, 0)
            current = None
            reporter.progress(done, total, STAGE_QUANTIZING)
        elif "failed to quantize" in message:
            failures.append(message.split("failed to quantize:", 1)[-1].strip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[qtype]
    params.nthread = threads
    reporter.progress(0, total, STAGE_QUANTIZING)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        reason = failures[-1] if failures else f"llama.cpp returned status {status}"
        raise _InputError(f"quantizing {source.name} to {qtype} failed: {reason}")
    reporter.progress(total, total, STAGE_QUANTIZING)


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.convert", description="internal: run by workers.convert")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert")
    convert.add_argument("--source-dir", type=Path, required=True)
    convert.add_argument("--outtype", choices=SUPPORTED_OUTTYPES, required=True)
    convert.add_argument("--model-name")
    convert.add_argument("--out", type=Path, required=True)
    quant = commands.add_parser("quantize")
    quant.add_argument("--source", type=Path, required=True)
    quant.add_argument("--qtype", choices=SUPPORTED_QUANT_TYPES, required=True)
    quant.add_argument("--threads", type=int, default=0)
    quant.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    # Events go to the real stdout; anything else that prints (Python or C) lands on stderr.
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reporter = _Reporter(channel)
    try:
        if args.command == "convert":
            _child_convert(args.source_dir, args.out, args.outtype, args.model_name, reporter)
        else:
            _child_quantize(args.source, args.out, args.qtype, args.threads, reporter)
    except _InputError as exc:
        reporter.send("error", message=str(exc))
        return 1
    except Exception as exc:  # the converter's own errors: pass its words on
        import traceback

        traceback.print_exc()
        reporter.send("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    reporter.send("done")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
