"""A bounded, strict reader of GGUF file headers, safe to run on untrusted uploads.

It reads the header incrementally (never the tensor data), checks every count and length
against the bytes that remain and against the limits below before it allocates anything for
it, and rejects anything llama.cpp would refuse or that could only come from a damaged or
hostile file. Every failure is a ``GGUFError`` whose message names what is wrong and the
byte offset where it was found.

Only the constants of the ``gguf`` package are used (value types, ggml types and their block
sizes, file types): its ``GGUFReader`` memory-maps the file and trusts the counts in it.

Layout (all little-endian): magic ``GGUF``, version u32, tensor_count u64, kv_count u64,
kv_count × (key string, value type u32, value), tensor_count × (name string, n_dims u32,
n_dims × u64 dims, ggml type u32, offset u64), padding to ``general.alignment``, tensor data.
A string is a u64 byte length and UTF-8 bytes; an array is an element type u32, a u64 count
and the elements.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

# --- Limits. Real headers are far below each; the numbers in brackets are the largest seen. ---
#: Whole header (everything before the tensor data). Bounds memory and time on any input.
#: [~10 MiB: a 256k-token vocabulary with its merges, e.g. Llama 3, Gemma 3, Command R]
MAX_HEADER_BYTES = 64 << 20
#: Metadata key/value pairs. [~60]
MAX_KV_COUNT = 1 << 16
#: Tensors. [~13k: a 128-expert MoE stored with one tensor per expert]
MAX_TENSOR_COUNT = 1 << 16
#: Elements in one array value. [262,144 tokens in Gemma 3's vocabulary]
MAX_ARRAY_LENGTH = 1 << 24
#: Bytes in one string value. [~100 KiB chat templates]
MAX_STRING_BYTES = 1 << 24
#: Bytes in a key: the GGUF specification's own limit.
MAX_KEY_BYTES = (1 << 16) - 1
#: Bytes in a tensor name: ggml's GGML_MAX_NAME (64) including the terminating NUL.
MAX_TENSOR_NAME_BYTES = 63
#: Dimensions of a tensor: ggml's GGML_MAX_DIMS.
MAX_DIMS = 4
#: Arrays of arrays: the format allows them, nothing real nests them deeper than this.
MAX_ARRAY_DEPTH = 4

# --- Hyperparameter bounds (``summarize`` checks them). llama.cpp checks some of these with
# GGML_ASSERT, which aborts the process that loads the file instead of failing the load; the
# rest are sane ranges, several times the largest real value (in brackets), that keep every
# size llama.cpp derives from them (tensor shapes, KV cache) far inside int64. The sources are
# llama-cpp-python 0.3.36's vendored llama.cpp: src/llama-hparams.h and llama_model_base::
# load_hparams in src/llama-model.cpp. ---
#: Layers (block_count): LLAMA_MAX_LAYERS, src/llama-hparams.h; load_hparams asserts
#: 0 < n_layer <= LLAMA_MAX_LAYERS (and nextn_predict_layers <= n_layer).
MAX_BLOCK_COUNT = 512
#: Experts (expert_count): LLAMA_MAX_EXPERTS, src/llama-hparams.h ("1024 // Kimi K3"); load_hparams
#: asserts n_expert <= LLAMA_MAX_EXPERTS, 0 < expert_used_count <= n_expert for a MoE and 0 for a
#: dense model, and the expert-group rules ``_check_experts`` repeats.
MAX_EXPERT_COUNT = 1024
#: Context length, also rope.scaling.original_context_length. [10,485,760: Llama 4 Scout]
MAX_CONTEXT_LENGTH = 1 << 27
#: Embedding length. [18,432: Nemotron-4 340B]
MAX_EMBEDDING_LENGTH = 1 << 16
#: Attention heads of one layer, and KV heads. [232: Falcon 180B]
MAX_HEAD_COUNT = 1 << 12
#: Size of one attention head (key_length, value_length). [576: DeepSeek V3's MLA keys]
MAX_HEAD_LENGTH = 1 << 13
#: Feed-forward length of one layer, also expert_feed_forward_length. [59,392: Falcon 180B]
MAX_FEED_FORWARD_LENGTH = 1 << 19
#: Vocabulary size (vocab_size, or the tokens array). [262,144: Gemma 3]
MAX_VOCAB_SIZE = 1 << 22

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGUF_MAGIC = b"GGUF"

_INT64_MAX = (1 << 63) - 1
_READ_CHUNK = 1 << 20

_SCALAR_FORMATS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# Numeric arrays are kept as array.array: one machine value per element, not one Python object.
_ARRAY_TYPECODES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# The fewest bytes one element of each type can take, to check a count before reading it.
_MIN_VALUE_BYTES = {vtype: fmt.size for vtype, fmt in _SCALAR_FORMATS.items()}
_MIN_VALUE_BYTES[GGUFValueType.STRING] = 8
_MIN_VALUE_BYTES[GGUFValueType.ARRAY] = 4 + 8
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """The file is not a GGUF file llama.cpp could load; the message says what and where."""

    def __init__(self, message: str, *, offset: int | None = None):
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous (row) dimension
    ggml_type: GGMLQuantizationType
    offset: int  # relative to GGUFHeader.data_offset
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # numeric arrays are array.array, string arrays list[str]
    tensors: list[GGUFTensorInfo] = field(repr=False)
    data_offset: int  # absolute offset of the tensor data, a multiple of alignment
    alignment: int


def check_magic(first_bytes: bytes) -> None:
    """Raise GGUFError unless ``first_bytes`` (a file's first bytes) can start a GGUF file we read.

    With 8 bytes or more the version is checked too, so an upload can be refused on its first chunk.
    """
    head = bytes(first_bytes[:8])
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        if len(head) >= 4 and head[:4] == GGUF_MAGIC[::-1]:
            raise GGUFError("not a GGUF file: the magic at byte 0 is byte-swapped ('FUGG'); "
                            "big-endian GGUF files are not supported", offset=0)
        raise GGUFError(f"not a GGUF file: it starts with {head[:4]!r} at byte 0, expected {GGUF_MAGIC!r}", offset=0)
    if len(head) < 8:
        return
    (version,) = _U32.unpack_from(head, 4)
    if version in SUPPORTED_VERSIONS:
        return
    (swapped,) = struct.unpack_from(">I", head, 4)
    if swapped in SUPPORTED_VERSIONS:
        raise GGUFError(f"big-endian GGUF files are not supported (version field at byte 4 reads {swapped} "
                        "big-endian); convert the model on a little-endian machine", offset=4)
    raise GGUFError(f"unsupported GGUF version {version} at byte 4 (supported: 2 and 3)", offset=4)


def read_header(source: str | Path | BinaryIO, *, file_size: int | None = None) -> GGUFHeader:
    """Parse and validate the GGUF header of a path or binary file object, without reading tensor data.

    A file object is read from its current position, which is taken as the start of the GGUF
    file; ``file_size`` (bytes from there to its end) is found by seeking when not given.
    Raises GGUFError for anything malformed, truncated, hostile or unsupported.
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as handle:
            return read_header(handle, file_size=file_size)
    if file_size is None:
        file_size = _remaining_size(source)
    if file_size < 0:
        raise ValueError("file_size must not be negative")
    return _Parser(_Cursor(source, file_size)).parse()


def summarize(header: GGUFHeader, *, file_size: int) -> dict[str, Any]:
    """The model registry's facts about a parsed header (JSON-serialisable).

    Keys: architecture, name, parameter_count, context_length, file_type, chat_template,
    tensor_count, size_bytes and ``metadata`` (block_count, head_count, head_count_kv,
    embedding_length, key_length, value_length, feed_forward_length, vocab_size,
    sliding_window, rope_dimension_count, rope_freq_base, rope_scaling_type,
    rope_scaling_factor, rope_scaling_original_context_length; None when absent). As in
    llama.cpp, key_length and value_length default to embedding_length / head_count. A
    per-layer array (some models vary head counts by layer) is summarised by its maximum,
    which is the safe side for memory estimates.

    Raises GGUFError, naming the key and its value, for a hyperparameter llama.cpp cannot load
    (see the bounds above): a layer or expert count past llama.cpp's limits, a context length,
    size or head count out of range, a per-layer array whose length is not the layer count, KV
    heads that do not divide the heads, sizes whose products overflow int64.
    """
    meta = header.metadata
    arch = _as_str(meta.get("general.architecture"))
    if arch:
        _check_hyperparameters(meta, arch)

    def arch_int(key: str) -> int | None:
        return _as_int(meta.get(f"{arch}.{key}")) if arch else None

    def arch_float(key: str) -> float | None:
        value = meta.get(f"{arch}.{key}") if arch else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    # llama.cpp's defaults when a model does not record its attention head size.
    embedding_length, head_count = arch_int("embedding_length"), arch_int("attention.head_count")
    head_size = embedding_length // head_count if embedding_length and head_count else None
    key_length = arch_int("attention.key_length") or head_size
    value_length = arch_int("attention.value_length") or head_size
    vocab_size = arch_int("vocab_size")
    tokens = meta.get("tokenizer.ggml.tokens")
    if vocab_size is None and isinstance(tokens, list):
        vocab_size = len(tokens)
    return {
        "architecture": arch,
        "name": _as_str(meta.get("general.name")),
        "parameter_count": sum(t.n_elements for t in header.tensors),
        "context_length": arch_int("context_length"),
        "file_type": _file_type_name(header),
        "chat_template": _as_str(meta.get("tokenizer.chat_template")),
        "tensor_count": len(header.tensors),
        "size_bytes": file_size,
        "metadata": {
            "block_count": arch_int("block_count"),
            "head_count": head_count,
            "head_count_kv": arch_int("attention.head_count_kv"),
            "embedding_length": embedding_length,
            "key_length": key_length,
            "value_length": value_length,
            "feed_forward_length": arch_int("feed_forward_length"),
            "vocab_size": vocab_size,
            "sliding_window": arch_int("attention.sliding_window"),
            "rope_dimension_count": arch_int("rope.dimension_count"),
            "rope_freq_base": arch_float("rope.freq_base"),
            "rope_scaling_type": (_as_str(meta.get(f"{arch}.rope.scaling.type")) or None) if arch else None,
            "rope_scaling_factor": arch_float("rope.scaling.factor"),
            "rope_scaling_original_context_length": arch_int("rope.scaling.original_context_length"),
        },
    }


# --- reading ---------------------------------------------------------------------------------


def _remaining_size(stream: BinaryIO) -> int:
    try:
        start = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(start)
    except (AttributeError, OSError, ValueError) as exc:
        raise ValueError("file_size is required for a stream that cannot seek") from exc
    return end - start


class _Cursor:
    """Reads exact byte counts from a stream in buffered chunks, refusing any read that the file
    cannot satisfy or that would take the header past MAX_HEADER_BYTES."""

    def __init__(self, stream: BinaryIO, file_size: int):
        self._stream = stream
        self.file_size = file_size
        self.offset = 0  # bytes consumed from the start of the file
        self._buf = b""
        self._pos = 0

    @property
    def remaining(self) -> int:
        return self.file_size - self.offset

    def header_room(self) -> int:
        """Bytes the header may still use: the smaller of what the file holds and the header cap."""
        return min(self.remaining, MAX_HEADER_BYTES - self.offset)

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise GGUFError(f"file is truncated: {what} at byte {self.offset} needs {n} bytes, "
                            f"only {max(self.remaining, 0)} remain", offset=self.offset)
        if self.offset + n > MAX_HEADER_BYTES:
            raise GGUFError(f"header is larger than the {MAX_HEADER_BYTES} byte limit "
                            f"({what} at byte {self.offset})", offset=self.offset)
        available = len(self._buf) - self._pos
        if n > available:
            self._fill(n - available, what)
        data = self._buf[self._pos:self._pos + n]
        self._pos += n
        self.offset += n
        return data

    def _fill(self, missing: int, what: str) -> None:
        parts = [self._buf[self._pos:]]
        want = min(max(missing, _READ_CHUNK), self.remaining - (len(self._buf) - self._pos))
        got = 0
        while got < want:
            chunk = self._stream.read(want - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got < missing:
            raise GGUFError(f"file is truncated: {what} at byte {self.offset} runs past the end of the data "
                            f"({self.offset + (len(self._buf) - self._pos) + got} bytes could be read)",
                            offset=self.offset)
        self._buf = b"".join(parts)
        self._pos = 0

    def u32(self, what: str) -> int:
        return _U32.unpack(self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack(self.take(8, what))[0]


class _Parser:
    def __init__(self, cursor: _Cursor):
        self.c = cursor

    def parse(self) -> GGUFHeader:
        c = self.c
        if c.file_size < 4:
            raise GGUFError(f"not a GGUF file: it is {c.file_size} bytes long, too short for the magic", offset=0)
        head = c.take(4, "magic")
        if c.remaining >= 4:
            head += c.take(4, "version")
        check_magic(head)  # the magic, and the version when the file is long enough to hold one
        version = _U32.unpack(head[4:] or c.take(4, "version"))[0]

        at = c.offset
        tensor_count = c.u64("tensor count")
        kv_at = c.offset
        kv_count = c.u64("metadata key count")
        self._check_count(tensor_count, MAX_TENSOR_COUNT, "tensor count", at)
        self._check_count(kv_count, MAX_KV_COUNT, "metadata key count", kv_at)
        needed = kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES
        if needed > c.remaining:
            raise GGUFError(f"{kv_count} metadata keys and {tensor_count} tensors (counts at bytes {at} and {kv_at}) "
                            f"cannot fit in the {c.remaining} bytes that remain", offset=at)

        metadata: dict[str, Any] = {}
        alignment = DEFAULT_ALIGNMENT
        for index in range(kv_count):
            key_at = c.offset
            key = self._key(index)
            if key in metadata:
                raise GGUFError(f"duplicate metadata key {key!r} at byte {key_at}", offset=key_at)
            type_at = c.offset
            vtype = self._value_type(c.u32(f"value type of {key!r}"), f"value of {key!r}", type_at)
            metadata[key] = self._value(vtype, key, depth=0)
            if key == "general.alignment":
                alignment = self._alignment(metadata[key], vtype, type_at)

        tensors: list[GGUFTensorInfo] = []
        names: set[str] = set()
        for index in range(tensor_count):
            info_at = c.offset
            tensor = self._tensor_info(index)
            if tensor.name in names:
                raise GGUFError(f"duplicate tensor name {tensor.name!r} at byte {info_at}", offset=info_at)
            names.add(tensor.name)
            tensors.append(tensor)

        data_offset = -(-c.offset // alignment) * alignment
        self._check_tensor_data(tensors, data_offset, alignment)
        return GGUFHeader(version=version, metadata=metadata, tensors=tensors, data_offset=data_offset,
                          alignment=alignment)

    def _check_count(self, count: int, limit: int, what: str, at: int) -> None:
        if count > limit:
            raise GGUFError(f"{what} {count} at byte {at} is over the limit of {limit}", offset=at)

    def _string(self, what: str, limit: int) -> bytes:
        c = self.c
        at = c.offset
        length = c.u64(f"length of {what}")
        if length > c.remaining:
            raise GGUFError(f"{what} at byte {at} claims {length} bytes, past the end of the file "
                            f"({c.remaining} bytes remain)", offset=at)
        if length > limit:
            raise GGUFError(f"{what} at byte {at} is {length} bytes long, over the limit of {limit}", offset=at)
        return c.take(length, what)

    def _key(self, index: int) -> str:
        at = self.c.offset
        raw = self._string(f"metadata key #{index}", MAX_KEY_BYTES)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"metadata key #{index} at byte {at} is not valid UTF-8 ({exc.reason})", offset=at) from None

    def _value_type(self, raw: int, what: str, at: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(f"unknown value type {raw} for {what} at byte {at}", offset=at) from None

    def _value(self, vtype: GGUFValueType, key: str, depth: int) -> Any:
        c = self.c
        if vtype == GGUFValueType.STRING:
            # Values, unlike keys, are decoded leniently: a stray byte in one vocabulary token
            # should not make a model unusable.
            return self._string(f"string value of {key!r}", MAX_STRING_BYTES).decode("utf-8", errors="replace")
        if vtype == GGUFValueType.ARRAY:
            return self._array(key, depth)
        at = c.offset
        fmt = _SCALAR_FORMATS[vtype]
        (value,) = fmt.unpack(c.take(fmt.size, f"value of {key!r}"))
        if vtype == GGUFValueType.BOOL:
            if value > 1:
                raise GGUFError(f"invalid bool value {value} for {key!r} at byte {at}", offset=at)
            return bool(value)
        return value

    def _array(self, key: str, depth: int) -> Any:
        c = self.c
        at = c.offset
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels in {key!r} at byte {at}", offset=at)
        etype = self._value_type(c.u32(f"array element type of {key!r}"), f"array elements of {key!r}", at)
        count_at = c.offset
        count = c.u64(f"array length of {key!r}")
        self._check_count(count, MAX_ARRAY_LENGTH, f"array length of {key!r}", count_at)
        room = c.header_room()
        if count * _MIN_VALUE_BYTES[etype] > room:
            where = "that remain in the file" if room == c.remaining else "left under the header size limit"
            raise GGUFError(f"array {key!r} at byte {at} claims {count} elements of type {etype.name}, "
                            f"which cannot fit in the {room} bytes {where}", offset=count_at)
        if etype in _ARRAY_TYPECODES:
            values = array.array(_ARRAY_TYPECODES[etype])
            values.frombytes(c.take(count * values.itemsize, f"array {key!r}"))
            if sys.byteorder == "big":
                values.byteswap()
            return values
        if etype == GGUFValueType.BOOL:
            raw = c.take(count, f"array {key!r}")
            if raw.translate(None, b"\x00\x01"):
                raise GGUFError(f"invalid bool value in array {key!r} at byte {count_at + 8}", offset=count_at + 8)
            return [b == 1 for b in raw]
        return [self._value(etype, key, depth + 1) for _ in range(count)]

    def _alignment(self, value: Any, vtype: GGUFValueType, at: int) -> int:
        if vtype != GGUFValueType.UINT32:
            raise GGUFError(f"general.alignment at byte {at} has type {vtype.name}, expected UINT32", offset=at)
        if value == 0 or value & (value - 1):
            raise GGUFError(f"general.alignment {value} at byte {at} is not a power of two", offset=at)
        return value

    def _tensor_info(self, index: int) -> GGUFTensorInfo:
        c = self.c
        at = c.offset
        raw_name = self._string(f"name of tensor #{index}", MAX_TENSOR_NAME_BYTES)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"name of tensor #{index} at byte {at} is not valid UTF-8", offset=at) from None
        label = f"tensor {name!r} (#{index}, at byte {at})"
        dims_at = c.offset
        n_dims = c.u32(f"n_dims of {label}")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{label} has {n_dims} dimensions (byte {dims_at}); at most {MAX_DIMS} are allowed",
                            offset=dims_at)
        shape = tuple(c.u64(f"dimensions of {label}") for _ in range(n_dims))
        n_elements = 1
        for dim in shape:
            if dim > _INT64_MAX:
                raise GGUFError(f"{label} has a dimension of {dim}, over the int64 range", offset=dims_at)
            n_elements *= dim
        if n_elements > _INT64_MAX:
            raise GGUFError(f"{label} has dimensions {list(shape)} whose product overflows int64", offset=dims_at)
        type_at = c.offset
        raw_type = c.u32(f"ggml type of {label}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise GGUFError(f"{label} has unknown ggml type {raw_type} at byte {type_at}", offset=type_at) from None
        if shape and shape[0] % block_size:
            raise GGUFError(f"{label} has rows of {shape[0]} elements, not a multiple of the {ggml_type.name} "
                            f"block size {block_size}", offset=dims_at)
        offset = c.u64(f"data offset of {label}")
        return GGUFTensorInfo(name=name, shape=shape, ggml_type=ggml_type, offset=offset, n_elements=n_elements,
                              n_bytes=n_elements // block_size * type_size)

    def _check_tensor_data(self, tensors: list[GGUFTensorInfo], data_offset: int, alignment: int) -> None:
        file_size = self.c.file_size
        for tensor in tensors:
            start = data_offset + tensor.offset
            if tensor.offset % alignment:
                raise GGUFError(f"tensor {tensor.name!r} has data offset {tensor.offset} (byte {start}), "
                                f"not a multiple of the alignment {alignment}", offset=start)
            if start + tensor.n_bytes > file_size:
                raise GGUFError(f"tensor {tensor.name!r} data (bytes {start} to {start + tensor.n_bytes}) extends past "
                                f"the end of the file ({file_size} bytes)", offset=start)
        previous = None
        for tensor in sorted(tensors, key=lambda t: t.offset):
            if previous is not None and tensor.offset < previous.offset + previous.n_bytes:
                raise GGUFError(f"tensor {tensor.name!r} data at byte {data_offset + tensor.offset} overlaps "
                                f"tensor {previous.name!r}",
                                offset=data_offset + tensor.offset)
            previous = tensor


# --- hyperparameters ---------------------------------------------------------------------------

# Keys that llama.cpp reads with get_key_or_arr(..., n_layer): one number for every layer, or an
# array of exactly block_count numbers (llama-model-loader.cpp).
_PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length",
                   "expert_feed_forward_length", "expert_used_count")


def _integer(meta: dict[str, Any], key: str) -> int | None:
    """A scalar integer hyperparameter; None when absent; GGUFError when it is not an integer."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{key} = {_shown(value)} is not an integer")
    return value


def _per_layer(meta: dict[str, Any], key: str, layers: int | None) -> list[int] | None:
    """A per-layer hyperparameter as one value per layer (a scalar repeated); None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, array.array):
        scalar = _integer(meta, key)
        return [scalar] * (layers or 1)
    if value.typecode in "fd":
        raise GGUFError(f"{key} = {_shown(value)} is an array of floats; llama.cpp needs integers")
    if layers is not None and len(value) != layers:
        raise GGUFError(f"{key} = {_shown(value)} has {len(value)} per-layer values, but block_count is {layers}")
    return list(value)


def _in_range(key: str, value: int | None, low: int, high: int, what: str, why: str = "") -> None:
    if value is not None and not low <= value <= high:
        raise GGUFError(f"{key} = {value}: {what} must be between {low} and {high}{why}")


def _shown(value: Any) -> str:
    if isinstance(value, array.array):
        items = value.tolist()
        return repr(items) if len(items) <= 8 else f"[{', '.join(map(str, items[:8]))}, ...] ({len(items)} values)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_hyperparameters(meta: dict[str, Any], arch: str) -> None:
    """Raise GGUFError for the first ``arch.*`` hyperparameter llama.cpp could not load (module bounds)."""
    def key(suffix: str) -> str:
        return f"{arch}.{suffix}"

    layers = _integer(meta, key("block_count"))
    _in_range(key("block_count"), layers, 1, MAX_BLOCK_COUNT, "the layer count",
              " (llama.cpp's LLAMA_MAX_LAYERS; it aborts on anything else)")
    nextn = _integer(meta, key("nextn_predict_layers"))
    _in_range(key("nextn_predict_layers"), nextn, 0, layers or MAX_BLOCK_COUNT, "the next-token prediction layers",
              " (at most block_count)")
    context = _integer(meta, key("context_length"))
    _in_range(key("context_length"), context, 1, MAX_CONTEXT_LENGTH, "the context length")
    _in_range(key("rope.scaling.original_context_length"), _integer(meta, key("rope.scaling.original_context_length")),
              1, MAX_CONTEXT_LENGTH, "the original context length")
    embedding = _integer(meta, key("embedding_length"))
    _in_range(key("embedding_length"), embedding, 1, MAX_EMBEDDING_LENGTH, "the embedding length")
    vocab = _integer(meta, key("vocab_size"))
    _in_range(key("vocab_size"), vocab, 1, MAX_VOCAB_SIZE, "the vocabulary size")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        _in_range("tokenizer.ggml.tokens", len(tokens), 1, MAX_VOCAB_SIZE, "the number of tokens")
    _check_experts(meta, key, layers)

    per_layer = {suffix: _per_layer(meta, key(suffix), layers) for suffix in _PER_LAYER_KEYS}
    for suffix in ("feed_forward_length", "expert_feed_forward_length"):
        for il, value in enumerate(per_layer[suffix] or ()):
            _in_range(_layer_key(key(suffix), il, meta), value, 0, MAX_FEED_FORWARD_LENGTH, "a feed-forward length")
    heads, kv_heads = per_layer["attention.head_count"], per_layer["attention.head_count_kv"]
    for il, value in enumerate(heads or ()):
        _in_range(_layer_key(key("attention.head_count"), il, meta), value, 0, MAX_HEAD_COUNT, "a head count")
    for il, value in enumerate(kv_heads or ()):
        name = _layer_key(key("attention.head_count_kv"), il, meta)
        layer_heads = heads[il] if heads is not None and il < len(heads) else None
        _in_range(name, value, 0, MAX_HEAD_COUNT if layer_heads is None else layer_heads, "a KV head count",
                  "" if layer_heads is None else f" ({_layer_key(key('attention.head_count'), il, meta)})")
        if value and layer_heads and layer_heads % value:  # ggml_mul_mat asserts it when attention runs
            raise GGUFError(f"{name} = {value} does not divide {_layer_key(key('attention.head_count'), il, meta)} "
                            f"= {layer_heads}: llama.cpp needs a whole number of heads per KV head")

    key_length, value_length = _integer(meta, key("attention.key_length")), _integer(meta, key("attention.value_length"))
    _in_range(key("attention.key_length"), key_length, 1, MAX_HEAD_LENGTH, "the key length")
    _in_range(key("attention.value_length"), value_length, 1, MAX_HEAD_LENGTH, "the value length")
    first_heads = heads[0] if heads else 0
    if first_heads and embedding and (key_length is None or value_length is None) and embedding % first_heads:
        # Without recorded head sizes llama.cpp takes embedding_length / head_count (of layer 0).
        raise GGUFError(f"{key('embedding_length')} = {embedding} is not a multiple of "
                        f"{_layer_key(key('attention.head_count'), 0, meta)} = {first_heads}, and no "
                        "attention.key_length and value_length say the head size")
    head_size = embedding // first_heads if embedding and first_heads else 0

    # Products of the sizes above, as llama.cpp computes them in int64.
    kv_width = max((kv_heads or heads or [0]), default=0) * ((key_length or head_size) + (value_length or head_size))
    n_tokens = vocab or (len(tokens) if isinstance(tokens, list) else None)
    products = [
        (f"{key('context_length')} × {key('embedding_length')} × {key('block_count')}",
         [context, embedding, layers]),
        (f"the F16 KV cache bytes at {key('context_length')} (context × layers × KV heads × (key + value length) × 2)",
         [context, layers, kv_width, 2]),
        (f"{key('embedding_length')} × the vocabulary size", [embedding, n_tokens]),
    ]
    for what, factors in products:
        if all(factors):
            product = 1
            for factor in factors:
                product *= factor
            if product > _INT64_MAX:
                raise GGUFError(f"{what} = {' × '.join(map(str, factors))} = {product} overflows int64")


def _check_experts(meta: dict[str, Any], key, layers: int | None) -> None:
    experts = _integer(meta, key("expert_count"))
    _in_range(key("expert_count"), experts, 0, MAX_EXPERT_COUNT, "the expert count",
              " (llama.cpp's LLAMA_MAX_EXPERTS; it aborts on more)")
    experts = experts or 0
    used = _per_layer(meta, key("expert_used_count"), layers)
    used_max = max(used, default=0) if used else 0
    used_key = key("expert_used_count")
    if experts and used is None:
        raise GGUFError(f"{used_key} is missing, but {key('expert_count')} = {experts}: llama.cpp aborts on a "
                        "mixture of experts that uses none")
    if experts:
        _in_range(used_key, used_max, 1, experts, "the experts used per token",
                  f" ({key('expert_count')} = {experts}; llama.cpp aborts otherwise)")
    elif used_max:
        raise GGUFError(f"{used_key} = {used_max}, but the model has no experts ({key('expert_count')} is "
                        f"{'absent' if meta.get(key('expert_count')) is None else 0}); llama.cpp aborts on that")
    groups = _integer(meta, key("expert_group_count")) or 0
    groups_used = _integer(meta, key("expert_group_used_count")) or 0
    if not experts:
        if groups:
            raise GGUFError(f"{key('expert_group_count')} = {groups}, but the model has no experts; llama.cpp "
                            "aborts on that")
        return
    _in_range(key("expert_group_count"), groups, 0, experts - 1, "the expert group count",
              f" (fewer than {key('expert_count')} = {experts})")
    if groups > 1:
        if experts % groups:
            raise GGUFError(f"{key('expert_group_count')} = {groups} does not divide {key('expert_count')} = "
                            f"{experts}; llama.cpp aborts on that")
        _in_range(key("expert_group_used_count"), groups_used, 1, groups - 1, "the expert groups used",
                  f" (fewer than {key('expert_group_count')} = {groups})")


def _layer_key(name: str, il: int, meta: dict[str, Any]) -> str:
    """A per-layer value's name: ``key[il]`` when the file stores an array, the key itself for a scalar."""
    return f"{name}[{il}]" if isinstance(meta.get(name), array.array) else name


# --- summarising -----------------------------------------------------------------------------


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, array.array) and value.typecode not in "fd" and len(value):
        return max(value)
    return None


def _file_type_name(header: GGUFHeader) -> str:
    """llama.cpp's name for the file type (Q4_K_M, F16, ...); inferred from the tensors when unrecorded."""
    raw = header.metadata.get("general.file_type")
    if isinstance(raw, int) and not isinstance(raw, bool):
        try:
            name = LlamaFileType(raw & ~LlamaFileType.GUESSED).name
        except ValueError:
            name = ""
        if name:
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    weights: Counter[str] = Counter()
    for tensor in header.tensors:
        weights[tensor.ggml_type.name] += tensor.n_elements
    return weights.most_common(1)[0][0] if weights else ""
