"""The GGUF header validator: the bundled model cross-checked against gguf's own reader, then
hostile, malformed and truncated headers built byte by byte by a small writer below."""

from __future__ import annotations

import array
import io
import random
import struct
import time
import tracemalloc

import gguf
import numpy
import pytest

from workers import gguf as validator
from workers.bundled import bundled_model_path
from workers.gguf import GGUFError, check_magic, read_header, summarize

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType

# --- a small GGUF writer, independent of the parser ---------------------------------------------

_SCALAR_PACK = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
                VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def value_bytes(vtype: VT, value, subtype: VT | None = None) -> bytes:
    if vtype == VT.STRING:
        return gstr(value)
    if vtype == VT.ARRAY:
        body = b"".join(value_bytes(subtype, item, VT.INT32) for item in value)
        return u32(subtype) + u64(len(value)) + body
    return struct.pack(_SCALAR_PACK[vtype], value)


def kv(key: str | bytes, vtype: VT, value, subtype: VT | None = None) -> bytes:
    return gstr(key) + u32(vtype) + value_bytes(vtype, value, subtype)


def tensor_info(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def gguf_bytes(kvs: list[bytes], tensors: list[bytes] = (), *, data_size: int = 0, version: int = 3,
               kv_count: int | None = None, tensor_count: int | None = None, alignment: int = 32) -> bytes:
    """A GGUF file: header, padding to ``alignment``, then ``data_size`` bytes of tensor data."""
    header = (b"GGUF" + u32(version) + u64(len(tensors) if tensor_count is None else tensor_count)
              + u64(len(kvs) if kv_count is None else kv_count) + b"".join(kvs) + b"".join(tensors))
    padding = -len(header) % alignment
    return header + b"\0" * padding + bytes(range(256)) * (data_size // 256) + b"\x07" * (data_size % 256)


SMALL_KVS = [
    kv("general.architecture", VT.STRING, "llama"),
    kv("general.name", VT.STRING, "tiny"),
    kv("general.alignment", VT.UINT32, 32),
    kv("llama.context_length", VT.UINT32, 256),
    kv("llama.block_count", VT.UINT32, 1),
    kv("llama.embedding_length", VT.UINT32, 64),
    kv("llama.attention.head_count", VT.UINT32, 4),
    kv("llama.attention.head_count_kv", VT.ARRAY, [2], VT.INT32),
    kv("llama.rope.freq_base", VT.FLOAT32, 10000.0),
    kv("llama.use_parallel_residual", VT.BOOL, True),
    kv("general.some_int64", VT.INT64, -5),
    kv("general.some_float64", VT.FLOAT64, 0.25),
    kv("general.some_int8", VT.INT8, -3),
    kv("general.some_uint16", VT.UINT16, 65535),
    kv("tokenizer.ggml.tokens", VT.ARRAY, ["a", "b", "\u00e9"], VT.STRING),
    kv("tokenizer.ggml.scores", VT.ARRAY, [0.5, -1.0, 2.0], VT.FLOAT32),
    kv("tokenizer.ggml.flags", VT.ARRAY, [True, False], VT.BOOL),
    kv("general.nested", VT.ARRAY, [[1, 2], [3]], VT.ARRAY),
]
SMALL_TENSORS = [  # (name, dims, type, offset): F32 4x3 = 48 bytes, Q8_0 32x2 = 68 bytes, F16 8 = 16 bytes
    ("token_embd.weight", (4, 3), QT.F32, 0),
    ("blk.0.attn_q.weight", (32, 2), QT.Q8_0, 64),
    ("output_norm.weight", (8,), QT.F16, 160),
]
SMALL_DATA_SIZE = 176


def small_gguf(kvs: list[bytes] = SMALL_KVS, tensors=SMALL_TENSORS, **kwargs) -> bytes:
    kwargs.setdefault("data_size", SMALL_DATA_SIZE)
    return gguf_bytes(kvs, [tensor_info(*t) for t in tensors], **kwargs)


def plain(value):
    """A parsed value as plain lists, for comparing with gguf's reader."""
    if isinstance(value, (array.array, list)):
        return [plain(item) for item in value]
    return value


def reject(data: bytes, **kwargs) -> str:
    with pytest.raises(GGUFError) as caught:
        read_header(io.BytesIO(data), **kwargs)
    return str(caught.value)


# --- the bundled model against gguf.GGUFReader --------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    return path, read_header(path), gguf.GGUFReader(path)


def test_it_reads_every_metadata_value_of_the_bundled_model_as_gguf_reader_does(bundled):
    _, header, reader = bundled
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(header.metadata) == list(fields)
    for key, field in fields.items():
        assert plain(header.metadata[key]) == field.contents(), key
    assert header.version == reader.fields["GGUF.version"].contents()
    assert header.alignment == reader.alignment
    assert header.data_offset == reader.data_offset


def test_it_reads_every_tensor_of_the_bundled_model_as_gguf_reader_does(bundled):
    _, header, reader = bundled
    assert len(header.tensors) == len(reader.tensors) == reader.fields["GGUF.tensor_count"].contents()
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.name == theirs.name
        assert list(ours.shape) == [int(d) for d in theirs.shape]
        assert ours.ggml_type == theirs.tensor_type
        assert header.data_offset + ours.offset == theirs.data_offset
        assert ours.n_elements == int(theirs.n_elements)
        assert ours.n_bytes == int(theirs.n_bytes)


def test_the_bundled_models_summary_agrees_with_gguf_reader(bundled):
    path, header, reader = bundled
    size = path.stat().st_size
    summary = summarize(header, file_size=size)

    def field(key):
        return reader.fields[key].contents()

    assert summary["architecture"] == field("general.architecture") == "llama"
    assert summary["name"] == field("general.name")
    assert summary["parameter_count"] == sum(int(t.n_elements) for t in reader.tensors)
    assert 130_000_000 < summary["parameter_count"] < 140_000_000  # SmolLM2-135M
    assert summary["context_length"] == field("llama.context_length")
    assert summary["file_type"] == gguf.LlamaFileType(field("general.file_type")).name.removeprefix("MOSTLY_") == "Q4_1"
    assert summary["chat_template"] == field("tokenizer.chat_template")
    assert summary["tensor_count"] == len(reader.tensors)
    assert summary["size_bytes"] == size
    meta = summary["metadata"]
    assert meta["block_count"] == field("llama.block_count")
    assert meta["head_count"] == field("llama.attention.head_count")
    assert meta["head_count_kv"] == field("llama.attention.head_count_kv")
    assert meta["embedding_length"] == field("llama.embedding_length")
    assert meta["feed_forward_length"] == field("llama.feed_forward_length")
    assert meta["vocab_size"] == len(field("tokenizer.ggml.tokens"))
    head_size = field("llama.embedding_length") // field("llama.attention.head_count")
    assert meta["key_length"] == meta["value_length"] == head_size
    assert meta["rope_dimension_count"] == field("llama.rope.dimension_count")
    assert meta["rope_freq_base"] == field("llama.rope.freq_base")
    assert meta["rope_scaling_type"] is None


def test_it_reads_only_the_header_of_the_bundled_model_not_its_tensor_data(bundled):
    path, header, _ = bundled

    class CountingFile(io.FileIO):
        bytes_read = 0

        def read(self, size=-1):
            data = super().read(size)
            CountingFile.bytes_read += len(data)
            return data

    with CountingFile(path, "rb") as handle:
        read_header(handle)
    assert CountingFile.bytes_read <= header.data_offset + (1 << 20)
    assert CountingFile.bytes_read < path.stat().st_size // 10


def test_it_reads_a_file_written_by_gguf_writer_with_every_value_type(tmp_path):
    path = tmp_path / "written.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    values = {"u8": (7, VT.UINT8), "i8": (-7, VT.INT8), "u16": (700, VT.UINT16), "i16": (-700, VT.INT16),
              "u32": (70000, VT.UINT32), "i32": (-70000, VT.INT32), "f32": (1.5, VT.FLOAT32), "b": (True, VT.BOOL),
              "s": ("h\u00e9llo", VT.STRING), "u64": (1 << 40, VT.UINT64), "i64": (-(1 << 40), VT.INT64),
              "f64": (0.1, VT.FLOAT64)}
    for name, (value, vtype) in values.items():
        writer.add_key_value(f"test.{name}", value, vtype)
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.strings", ["x", "yz"])
    writer.add_tensor("w", numpy.ones((3, 64), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header, reader = read_header(path), gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert plain(header.metadata[key]) == field.contents(), key
    assert [(t.name, t.shape, t.n_bytes) for t in header.tensors] == [("w", (64, 3), 3 * 64 * 4)]
    assert header.data_offset + header.tensors[0].offset == reader.tensors[0].data_offset


# --- a small valid file ------------------------------------------------------------------------------


def test_it_reads_every_value_type_of_a_small_handwritten_file():
    header = read_header(io.BytesIO(small_gguf()))
    meta = header.metadata
    assert header.version == 3
    assert meta["general.name"] == "tiny"
    assert meta["llama.use_parallel_residual"] is True
    assert meta["general.some_int64"] == -5 and meta["general.some_int8"] == -3
    assert meta["general.some_float64"] == 0.25 and meta["general.some_uint16"] == 65535
    assert meta["tokenizer.ggml.tokens"] == ["a", "b", "\u00e9"]
    assert plain(meta["tokenizer.ggml.scores"]) == [0.5, -1.0, 2.0]
    assert meta["tokenizer.ggml.flags"] == [True, False]
    assert plain(meta["general.nested"]) == [[1, 2], [3]]
    assert [(t.name, t.shape, t.ggml_type, t.offset, t.n_bytes) for t in header.tensors] == [
        ("token_embd.weight", (4, 3), QT.F32, 0, 48),
        ("blk.0.attn_q.weight", (32, 2), QT.Q8_0, 64, 68),
        ("output_norm.weight", (8,), QT.F16, 160, 16),
    ]
    assert header.data_offset % 32 == 0
    assert header.data_offset + SMALL_DATA_SIZE == len(small_gguf())


def test_it_accepts_version_2_files():
    assert read_header(io.BytesIO(small_gguf(version=2))).version == 2


def test_it_reads_a_file_object_from_its_current_position():
    handle = io.BytesIO(b"junk" + small_gguf())
    handle.seek(4)
    assert len(read_header(handle).tensors) == 3


def test_the_summary_infers_the_file_type_from_the_dominant_tensor_type_when_unrecorded():
    summary = summarize(read_header(io.BytesIO(small_gguf())), file_size=0)
    assert summary["file_type"] == "Q8_0"  # 64 elements, more than the F32 (12) or F16 (8) tensors
    assert summary["parameter_count"] == 12 + 64 + 8
    assert summary["context_length"] == 256
    assert summary["chat_template"] == ""
    assert summary["metadata"]["head_count_kv"] == 2  # a per-layer array, summarised by its maximum
    assert summary["metadata"]["key_length"] == 16  # 64 / 4, llama.cpp's default
    assert summary["metadata"]["feed_forward_length"] is None
    assert summary["metadata"]["vocab_size"] == 3


def test_the_summary_names_the_recorded_file_type_as_llama_cpp_does():
    for file_type, name in [(15, "Q4_K_M"), (1, "F16"), (0, "F32"), (32, "BF16"), (3 | 1024, "Q4_1")]:
        data = small_gguf(SMALL_KVS + [kv("general.file_type", VT.UINT32, file_type)])
        assert summarize(read_header(io.BytesIO(data)), file_size=len(data))["file_type"] == name


def test_check_magic_accepts_the_start_of_a_gguf_file_and_rejects_anything_else():
    check_magic(b"GGUF")
    check_magic(small_gguf()[:64])
    for junk in [b"", b"GG", b"PK\x03\x04rest", b"<!doctype html>", b"\x00" * 8]:
        with pytest.raises(GGUFError, match="not a GGUF file"):
            check_magic(junk)
    with pytest.raises(GGUFError, match="unsupported GGUF version 1 at byte 4"):
        check_magic(b"GGUF" + u32(1))


# --- hostile and malformed headers -----------------------------------------------------------------


def _mutated(offset: int, raw: bytes, data: bytes | None = None) -> bytes:
    data = small_gguf() if data is None else data
    return data[:offset] + raw + data[offset + len(raw):]



_TYPE_NAME_KVS = [kv("general.architecture", VT.STRING, "llama")]


def _one_tensor(dims, ggml_type=QT.F32, offset=0, data_size=64, **kwargs) -> bytes:
    return gguf_bytes(_TYPE_NAME_KVS, [tensor_info("t", dims, ggml_type, offset)], data_size=data_size, **kwargs)


HOSTILE = {
    "bad magic": (b"GGML" + small_gguf()[4:], "not a GGUF file: it starts with b'GGML' at byte 0"),
    "an html page": (b"<html><body>not a model</body></html>", "not a GGUF file"),
    "a three byte file": (b"GGU", "not a GGUF file"),
    "version 1": (small_gguf(version=1), "unsupported GGUF version 1 at byte 4"),
    "an unknown version": (small_gguf(version=4), "unsupported GGUF version 4 at byte 4"),
    "a big-endian file": (b"GGUF" + struct.pack(">I", 3) + small_gguf()[8:], "big-endian GGUF files are not supported"),
    "2^60 tensors": (_mutated(8, u64(1 << 60)), "tensor count 1152921504606846976 at byte 8 is over the limit"),
    "2^60 metadata keys": (_mutated(16, u64(1 << 60)), "metadata key count 1152921504606846976 at byte 16 is over"),
    "more keys than the file can hold": (_mutated(16, u64(60_000)), "cannot fit in the"),
    "a 2^40 byte string": (gguf_bytes([gstr("general.name") + u32(VT.STRING) + u64(1 << 40) + b"tiny"]),
                           "string value of 'general.name' at byte 48 claims 1099511627776 bytes, past the end"),
    "a key longer than the file": (b"GGUF" + u32(3) + u64(0) + u64(1) + u64(1 << 62) + b"abc" * 10,
                                   "metadata key #0 at byte 24 claims 4611686018427387904 bytes, past the end"),
    "a 2^60 element array": (gguf_bytes([gstr("a") + u32(VT.ARRAY) + u32(VT.UINT8) + u64(1 << 60)]),
                             "array length of 'a' 1152921504606846976 at byte 41 is over the limit"),
    "an array longer than the file": (gguf_bytes([gstr("a") + u32(VT.ARRAY) + u32(VT.UINT64) + u64(1000) + u64(1)]),
                                      "array 'a' at byte 37 claims 1000 elements of type UINT64, which cannot fit"),
    "a string array longer than the file": (
        gguf_bytes([gstr("a") + u32(VT.ARRAY) + u32(VT.STRING) + u64(1 << 20) + gstr("x")]),
        "claims 1048576 elements of type STRING, which cannot fit"),
    "an unknown value type": (gguf_bytes([gstr("a") + u32(13) + u64(0)]),
                              "unknown value type 13 for value of 'a' at byte 33"),
    "an unknown array element type": (gguf_bytes([gstr("a") + u32(VT.ARRAY) + u32(99) + u64(1) + u64(0)]),
                                      "unknown value type 99 for array elements of 'a' at byte 37"),
    "a key that is not UTF-8": (gguf_bytes([kv(b"general.\xff\xfe", VT.UINT8, 1)]),
                                "metadata key #0 at byte 24 is not valid UTF-8"),
    "a duplicate key": (gguf_bytes([kv("general.name", VT.STRING, "a"), kv("general.name", VT.STRING, "b")]),
                        "duplicate metadata key 'general.name' at byte 57"),
    "an invalid bool": (gguf_bytes([gstr("b") + u32(VT.BOOL) + b"\x02"]), "invalid bool value 2 for 'b' at byte 37"),
    "an invalid bool in an array": (gguf_bytes([gstr("b") + u32(VT.ARRAY) + u32(VT.BOOL) + u64(2) + b"\x01\x09"]),
                                    "invalid bool value in array 'b' at byte 49"),
    "arrays nested too deep": (gguf_bytes([gstr("n") + u32(VT.ARRAY) + (u32(VT.ARRAY) + u64(1)) * 6
                                           + u32(VT.UINT8) + u64(0)]),
                               "arrays nested deeper than 4 levels in 'n'"),
    "an alignment that is not a power of two": (gguf_bytes([kv("general.alignment", VT.UINT32, 24)]),
                                                "general.alignment 24 at byte 49 is not a power of two"),
    "a zero alignment": (gguf_bytes([kv("general.alignment", VT.UINT32, 0)]), "general.alignment 0"),
    "an alignment of the wrong type": (gguf_bytes([kv("general.alignment", VT.UINT64, 32)]),
                                       "general.alignment at byte 49 has type UINT64, expected UINT32"),
    "five dimensions": (_one_tensor((1, 1, 1, 1, 1)), "tensor 't' (#0, at byte 69) has 5 dimensions (byte 78)"),
    "dimensions whose product overflows": (_one_tensor((1 << 32, 1 << 32)), "whose product overflows int64"),
    "a dimension over int64": (_one_tensor((1 << 63,)), "has a dimension of 9223372036854775808, over the int64 range"),
    "an unknown ggml type": (_one_tensor((4,), ggml_type=4242),
                             "tensor 't' (#0, at byte 69) has unknown ggml type 4242 at byte 90"),
    "a removed ggml type": (_one_tensor((32,), ggml_type=4), "has unknown ggml type 4"),
    "rows that do not fill a quantization block": (_one_tensor((33, 2), ggml_type=QT.Q4_0),
                                                   "has rows of 33 elements, not a multiple of the Q4_0 block size 32"),
    "tensor data past the end of the file": (_one_tensor((17,)), "tensor 't' data (bytes 128 to 196) extends past the end"),
    "a huge tensor in a small file": (_one_tensor((1 << 31, 1 << 31)), "extends past the end of the file"),
    "a misaligned tensor offset": (_one_tensor((4,), offset=8),
                                   "tensor 't' has data offset 8 (byte 136), not a multiple of the alignment 32"),
    "overlapping tensors": (gguf_bytes(_TYPE_NAME_KVS, [tensor_info("a", (16,), QT.F32, 0),
                                                        tensor_info("b", (16,), QT.F32, 32)], data_size=128),
                            "tensor 'b' data at byte 192 overlaps tensor 'a'"),
    "a duplicate tensor name": (gguf_bytes(_TYPE_NAME_KVS, [tensor_info("a", (8,), QT.F32, 0),
                                                            tensor_info("a", (8,), QT.F32, 32)], data_size=64),
                                "duplicate tensor name 'a' at byte 102"),
    "a tensor name over 63 bytes": (gguf_bytes(_TYPE_NAME_KVS, [tensor_info("x" * 64, (8,), QT.F32, 0)], data_size=32),
                                    "name of tensor #0 at byte 69 is 64 bytes long, over the limit of 63"),
    "a tensor name that is not UTF-8": (gguf_bytes(_TYPE_NAME_KVS, [gstr(b"\xc3(") + u32(1) + u64(8) + u32(0) + u64(0)],
                                                   data_size=32), "name of tensor #0 at byte 69 is not valid UTF-8"),
}


@pytest.mark.parametrize("data, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_it_rejects_a_hostile_or_malformed_header_quickly_with_a_message_that_says_where(data, message):
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = reject(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in error
    assert time.perf_counter() - started < 1
    assert peak < 256 * 1024


def test_it_rejects_a_header_over_the_size_limit(monkeypatch):
    monkeypatch.setattr(validator, "MAX_HEADER_BYTES", 100)
    assert "header is larger than the 100 byte limit" in reject(small_gguf())


def test_it_rejects_an_array_that_cannot_fit_under_the_header_size_limit(monkeypatch):
    data = gguf_bytes([kv("a", VT.ARRAY, list(range(64)), VT.UINT32)])
    monkeypatch.setattr(validator, "MAX_HEADER_BYTES", 128)
    assert "left under the header size limit" in reject(data)


def test_it_rejects_a_string_over_the_string_limit(monkeypatch):
    monkeypatch.setattr(validator, "MAX_STRING_BYTES", 3)
    assert "string value of 'general.architecture' at byte 56 is 5 bytes long, over the limit of 3" in reject(small_gguf())


def test_it_rejects_a_file_shorter_than_the_size_it_was_given():
    data = small_gguf()
    assert "file is truncated" in reject(data[:100], file_size=len(data))


def test_it_needs_a_size_for_a_stream_that_cannot_seek():
    class Pipe(io.RawIOBase):
        def readable(self):
            return True

        def seekable(self):
            return False

        def seek(self, *args):
            raise io.UnsupportedOperation("seek")

    with pytest.raises(ValueError, match="file_size is required"):
        read_header(Pipe())


def test_it_rejects_a_small_file_truncated_at_every_byte_with_only_gguf_errors():
    data = small_gguf()
    for cut in range(len(data)):
        with pytest.raises(GGUFError):
            read_header(io.BytesIO(data[:cut]))
    read_header(io.BytesIO(data))


def test_random_byte_flips_in_a_small_file_only_ever_raise_gguf_errors():
    rng = random.Random(20240611)
    data = small_gguf()
    header_end = len(data) - SMALL_DATA_SIZE
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(header_end)
            mutated[position] = rng.choice([0, 0xFF, 0x80, 0x7F, rng.randrange(256)])
        if rng.random() < 0.2:
            mutated = mutated[:rng.randrange(len(mutated))]
        try:
            read_header(io.BytesIO(bytes(mutated)))
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["rejected"] += 1
    assert outcomes["ok"] and outcomes["rejected"]


# --- hyperparameters llama.cpp cannot load -------------------------------------------------------
# Each file below passes the header checks above; ``summarize`` refuses it, naming the key and value.
# Some of them (a layer count of 0 or over 512, too many experts, KV heads that do not divide the
# heads) abort llama.cpp itself: tests/models/test_trial_load.py shows one doing so.

_HPARAMS = {  # a small llama header: key -> (type, value, array element type)
    "general.architecture": (VT.STRING, "llama", None),
    "llama.context_length": (VT.UINT32, 4096, None),
    "llama.block_count": (VT.UINT32, 2, None),
    "llama.embedding_length": (VT.UINT32, 256, None),
    "llama.feed_forward_length": (VT.UINT32, 512, None),
    "llama.attention.head_count": (VT.UINT32, 8, None),
    "llama.attention.head_count_kv": (VT.UINT32, 4, None),
}


def hparams_gguf(**changes) -> bytes:
    """A small header with ``_HPARAMS`` changed: ``key=(type, value[, element type])``, or ``key=None`` to drop
    it; keys are given with ``__`` for ``.`` after the architecture (``attention__head_count``)."""
    entries = dict(_HPARAMS)
    for name, change in changes.items():
        key = name if name.startswith("general") else "llama." + name.replace("__", ".")
        if change is None:
            entries.pop(key, None)
        else:
            entries[key] = (*change, None)[:3]
    return gguf_bytes([kv(key, vtype, value, subtype) for key, (vtype, value, subtype) in entries.items()],
                      [tensor_info("token_embd.weight", (8,), QT.F32, 0)], data_size=32)


def summarize_bytes(data: bytes) -> dict:
    return summarize(read_header(io.BytesIO(data)), file_size=len(data))


U32, I32, U64, F32 = VT.UINT32, VT.INT32, VT.UINT64, VT.FLOAT32
HOSTILE_HPARAMS = {
    "2^32-1 layers (aborts llama.cpp)": (
        hparams_gguf(block_count=(U32, 0xFFFFFFFF)),
        "llama.block_count = 4294967295: the layer count must be between 1 and 512 (llama.cpp's LLAMA_MAX_LAYERS"),
    "no layers (aborts llama.cpp)": (hparams_gguf(block_count=(U32, 0)), "llama.block_count = 0: the layer count"),
    "513 layers": (hparams_gguf(block_count=(U32, 513)), "llama.block_count = 513: the layer count"),
    "a layer count that is an array": (hparams_gguf(block_count=(VT.ARRAY, [2, 2], I32)),
                                       "llama.block_count = [2, 2] is not an integer"),
    "more prediction layers than layers": (hparams_gguf(nextn_predict_layers=(U32, 3)),
                                           "llama.nextn_predict_layers = 3: the next-token prediction layers must be "
                                           "between 0 and 2"),
    "1025 experts (aborts llama.cpp)": (
        hparams_gguf(expert_count=(U32, 1025), expert_used_count=(U32, 2)),
        "llama.expert_count = 1025: the expert count must be between 0 and 1024 (llama.cpp's LLAMA_MAX_EXPERTS"),
    "experts but none used": (hparams_gguf(expert_count=(U32, 8)), "llama.expert_used_count is missing"),
    "more experts used than there are": (hparams_gguf(expert_count=(U32, 8), expert_used_count=(U32, 9)),
                                         "llama.expert_used_count = 9: the experts used per token must be between 1 "
                                         "and 8"),
    "experts used without experts": (hparams_gguf(expert_used_count=(U32, 2)),
                                     "llama.expert_used_count = 2, but the model has no experts"),
    "as many expert groups as experts": (
        hparams_gguf(expert_count=(U32, 8), expert_used_count=(U32, 2), expert_group_count=(U32, 8)),
        "llama.expert_group_count = 8: the expert group count must be between 0 and 7"),
    "expert groups that do not divide the experts": (
        hparams_gguf(expert_count=(U32, 8), expert_used_count=(U32, 2), expert_group_count=(U32, 3),
                     expert_group_used_count=(U32, 1)),
        "llama.expert_group_count = 3 does not divide llama.expert_count = 8"),
    "every expert group used": (
        hparams_gguf(expert_count=(U32, 8), expert_used_count=(U32, 2), expert_group_count=(U32, 4),
                     expert_group_used_count=(U32, 4)),
        "llama.expert_group_used_count = 4: the expert groups used must be between 1 and 3"),
    "a context length of 0": (hparams_gguf(context_length=(U32, 0)), "llama.context_length = 0: the context length"),
    "a context length of 2^27 + 1": (hparams_gguf(context_length=(U32, (1 << 27) + 1)),
                                     "llama.context_length = 134217729: the context length must be between 1 and "
                                     "134217728"),
    "a negative context length": (hparams_gguf(context_length=(I32, -1)), "llama.context_length = -1"),
    "a float context length": (hparams_gguf(context_length=(F32, 4096.0)), "llama.context_length = 4096.0 is not an "
                                                                             "integer"),
    "an original context length of 2^32": (hparams_gguf(rope__scaling__original_context_length=(U64, 1 << 32)),
                                           "llama.rope.scaling.original_context_length = 4294967296"),
    "an embedding length of 0": (hparams_gguf(embedding_length=(U32, 0)), "llama.embedding_length = 0"),
    "an embedding length of 2^16 + 1": (hparams_gguf(embedding_length=(U32, 65537), attention__key_length=(U32, 64),
                                                     attention__value_length=(U32, 64)),
                                        "llama.embedding_length = 65537: the embedding length must be between 1 and "
                                        "65536"),
    "4097 heads": (hparams_gguf(attention__head_count=(U32, 4097), attention__head_count_kv=(U32, 1),
                                attention__key_length=(U32, 64), attention__value_length=(U32, 64)),
                   "llama.attention.head_count = 4097: a head count must be between 0 and 4096"),
    "more KV heads than heads": (hparams_gguf(attention__head_count_kv=(U32, 16)),
                                 "llama.attention.head_count_kv = 16: a KV head count must be between 0 and 8"),
    "KV heads that do not divide the heads (aborts llama.cpp)": (
        hparams_gguf(attention__head_count_kv=(U32, 3)),
        "llama.attention.head_count_kv = 3 does not divide llama.attention.head_count = 8"),
    "heads that do not divide the embedding": (
        hparams_gguf(embedding_length=(U32, 260)),
        "llama.embedding_length = 260 is not a multiple of llama.attention.head_count = 8"),
    "a key length of 0": (hparams_gguf(attention__key_length=(U32, 0), attention__value_length=(U32, 32)),
                          "llama.attention.key_length = 0: the key length must be between 1 and 8192"),
    "a value length of 2^13 + 1": (hparams_gguf(attention__key_length=(U32, 32), attention__value_length=(U32, 8193)),
                                   "llama.attention.value_length = 8193: the value length"),
    "a feed-forward length of 2^19 + 1": (hparams_gguf(feed_forward_length=(U32, (1 << 19) + 1)),
                                          "llama.feed_forward_length = 524289: a feed-forward length"),
    "an expert feed-forward length of 2^32 - 1": (
        hparams_gguf(expert_feed_forward_length=(U32, 0xFFFFFFFF)),
        "llama.expert_feed_forward_length = 4294967295: a feed-forward length"),
    "a per-layer array shorter than the layers": (
        hparams_gguf(attention__head_count_kv=(VT.ARRAY, [4], I32)),
        "llama.attention.head_count_kv = [4] has 1 per-layer values, but block_count is 2"),
    "a per-layer array longer than the layers": (
        hparams_gguf(feed_forward_length=(VT.ARRAY, [512] * 600, I32)),
        "llama.feed_forward_length = [512, 512, 512, 512, 512, 512, 512, 512, ...] (600 values) has 600 per-layer "
        "values, but block_count is 2"),
    "a per-layer array of floats": (hparams_gguf(feed_forward_length=(VT.ARRAY, [512.0, 512.0], F32)),
                                    "llama.feed_forward_length = [512.0, 512.0] is an array of floats"),
    "one layer's KV heads not dividing its heads": (
        hparams_gguf(attention__head_count=(VT.ARRAY, [8, 8], I32), attention__head_count_kv=(VT.ARRAY, [4, 3], I32)),
        "llama.attention.head_count_kv[1] = 3 does not divide llama.attention.head_count[1] = 8"),
    "a vocabulary of 2^22 + 1": (hparams_gguf(vocab_size=(U32, (1 << 22) + 1)),
                                 "llama.vocab_size = 4194305: the vocabulary size must be between 1 and 4194304"),
    "an empty vocabulary": (hparams_gguf(vocab_size=(U32, 0)), "llama.vocab_size = 0"),
    "a KV cache past int64": (
        hparams_gguf(context_length=(U32, 1 << 27), block_count=(U32, 512), attention__head_count=(U32, 4096),
                     attention__head_count_kv=(U32, 4096), attention__key_length=(U32, 8192),
                     attention__value_length=(U32, 8192)),
        "the F16 KV cache bytes at llama.context_length (context × layers × KV heads × (key + value length) × 2) = "
        "134217728 × 512 × 67108864 × 2 = 9223372036854775808 overflows int64"),
}


@pytest.mark.parametrize("data, message", HOSTILE_HPARAMS.values(), ids=HOSTILE_HPARAMS.keys())
def test_the_summary_rejects_a_hyperparameter_llama_cpp_cannot_load_naming_its_key_and_value(data, message):
    read_header(io.BytesIO(data))  # a well-formed header: only the bounds refuse it
    with pytest.raises(GGUFError) as caught:
        summarize_bytes(data)
    assert message in str(caught.value)


def test_the_summary_rejects_sizes_whose_product_overflows_int64_even_within_raised_bounds(monkeypatch):
    monkeypatch.setattr(validator, "MAX_CONTEXT_LENGTH", 1 << 40)
    data = hparams_gguf(context_length=(U64, 1 << 40), block_count=(U32, 512), embedding_length=(U32, 65536),
                        attention__head_count=(U32, 1), attention__head_count_kv=(U32, 1))
    with pytest.raises(GGUFError, match="llama.context_length × llama.embedding_length × llama.block_count = "
                                        "1099511627776 × 65536 × 512 = .* overflows int64"):
        summarize_bytes(data)


def test_the_summary_accepts_headers_at_the_bounds_and_the_shapes_real_models_use():
    at_bounds = hparams_gguf(block_count=(U32, 512), context_length=(U32, 1 << 27), embedding_length=(U32, 65536),
                             attention__head_count=(U32, 4096), attention__head_count_kv=(U32, 1),
                             feed_forward_length=(U32, 1 << 19), vocab_size=(U32, 1 << 22),
                             expert_count=(U32, 1024), expert_used_count=(U32, 1024))
    moe = hparams_gguf(expert_count=(U32, 256), expert_used_count=(U32, 8), expert_group_count=(U32, 8),
                       expert_group_used_count=(U32, 4), expert_feed_forward_length=(U32, 2048))
    hybrid = hparams_gguf(attention__head_count=(U32, 8), attention__head_count_kv=(VT.ARRAY, [0, 2], I32),
                          feed_forward_length=(VT.ARRAY, [0, 512], I32))  # a recurrent layer, then attention
    mla = hparams_gguf(embedding_length=(U32, 7168), attention__head_count=(U32, 128),
                       attention__head_count_kv=(U32, 128), attention__key_length=(U32, 576),
                       attention__value_length=(U32, 512))
    for data in (at_bounds, moe, hybrid, mla):
        summarize_bytes(data)
    assert summarize_bytes(hybrid)["metadata"]["head_count_kv"] == 2
