"""GGUF header pre-checks (quant.sources.gguf_check): counts and lengths bounded by the file size,
metadata value types, tensor extents; each damage refused by `convert` in one line naming the field,
before gguf.GGUFReader could loop or allocate on a bad count."""

from __future__ import annotations

import resource
import struct

import gguf
import pytest

from mixcli.errors import CheckpointError
from quant.gguf_convert import convert_gguf
from quant.sources.gguf_check import check_gguf_header
from test_gguf_import import make_gguf_checkpoint


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    path, _, _ = make_gguf_checkpoint(tmp_path_factory.mktemp("gguf") / "baby.gguf", "mixtral")
    reader = gguf.GGUFReader(path)
    return path, path.read_bytes(), reader


def _field_value_at(reader, key: str) -> int:
    """Byte offset of a field's value (for an array: of its element type)."""
    f = reader.fields[key]
    return f.offset + 8 + len(key) + 4


def _tensor_info_at(reader, name: str) -> int:
    return next(t.field.offset for t in reader.tensors if t.name == name)


def refused(tmp_path, data: bytes, fragment: str) -> str:
    src = tmp_path / "bad.gguf"
    src.write_bytes(data)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as err:
        convert_gguf(src, tmp_path / "out" / "model")
    assert fragment in err.value.message, err.value.message
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KB: no runaway allocation
    return err.value.message


def test_intact_header_passes(seed):
    check_gguf_header(seed[0])


def test_array_count_beyond_the_file(seed, tmp_path):
    path, data, reader = seed
    at = _field_value_at(reader, "tokenizer.ggml.tokens") + 4  # after the element type: the u64 count
    bad = bytearray(data)
    bad[at : at + 8] = struct.pack("<Q", 2**40)
    refused(tmp_path, bytes(bad), "array tokenizer.ggml.tokens claims 1099511627776 x 8 bytes")


def test_string_length_beyond_the_file(seed, tmp_path):
    path, data, reader = seed
    at = reader.fields["general.architecture"].offset + 8 + len("general.architecture") + 4
    bad = bytearray(data)
    bad[at : at + 8] = struct.pack("<Q", 2**62)
    refused(tmp_path, bytes(bad), "general.architecture is 4611686018427387904 bytes long, but only")


def test_tensor_and_kv_counts(seed, tmp_path):
    _, data, _ = seed
    refused(tmp_path, data[:8] + struct.pack("<Q", 2**60) + data[16:], "tensor count")
    refused(tmp_path, data[:16] + struct.pack("<Q", 2**33) + data[24:], "key-value count 8589934592")


def test_metadata_of_the_wrong_type(seed, tmp_path):
    path, data, reader = seed
    at = reader.fields["llama.block_count"].offset + 8 + len("llama.block_count")
    bad = bytearray(data)
    bad[at : at + 4] = struct.pack("<I", 6)  # the u32 value now reads as a float32
    refused(tmp_path, bytes(bad), "metadata llama.block_count is")


def test_tensor_outside_the_file(seed, tmp_path):
    path, data, reader = seed
    name = "blk.1.ffn_down_exps.weight"
    start = _tensor_info_at(reader, name)
    n_dims_at = start + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, n_dims_at)
    offset_at = n_dims_at + 4 + 8 * n_dims + 4
    bad = bytearray(data)
    bad[offset_at : offset_at + 8] = struct.pack("<Q", 1 << 40)
    refused(tmp_path, bytes(bad), f"tensor {name} (offset 1099511627776")
    bad = bytearray(data)
    bad[n_dims_at : n_dims_at + 4] = struct.pack("<I", 9)
    refused(tmp_path, bytes(bad), f"tensor {name} has 9 dimensions")


def test_non_utf8_key(seed, tmp_path):
    path, data, reader = seed
    at = reader.fields["general.architecture"].offset + 8
    bad = bytearray(data)
    bad[at] = 0xFF
    refused(tmp_path, bytes(bad), "is not UTF-8 (byte 0 of")


def test_metadata_that_would_divide_by_zero_is_never_written(tmp_path, seed):
    """rms eps 0 (a ZeroDivisionError-class config) is refused before anything is written."""
    path, data, reader = seed
    at = (
        reader.fields["llama.attention.layer_norm_rms_epsilon"].offset
        + 8
        + len("llama.attention.layer_norm_rms_epsilon")
        + 4
    )
    bad = bytearray(data)
    bad[at : at + 4] = struct.pack("<f", 0.0)
    refused(tmp_path, bytes(bad), "rms_norm_eps is 0.0, expected a number > 0")


def test_nan_in_a_copied_tensor_is_refused(tmp_path):
    """Exactly copied blocks are checked like quantized ones: a NaN norm weight never gets written."""
    from babymodels import BABY_DEFAULTS, random_weights
    from test_gguf_import import write_gguf

    cfg = {**BABY_DEFAULTS["llama"], "tie_word_embeddings": True}
    weights = random_weights(cfg)
    weights["model.layers.1.post_attention_layernorm.weight"][5] = float("nan")
    src = write_gguf(tmp_path / "nan.gguf", cfg, weights)
    with pytest.raises(
        CheckpointError, match=r"tensor blk\.1\.ffn_norm\.weight has 1 NaN or inf value\(s\) in its weights"
    ):
        convert_gguf(src, tmp_path / "out" / "model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("llama.attention.head_count", 0, "metadata llama.attention.head_count is 0, expected 1.."),  # d // h
        ("llama.block_count", 1000, "llama.block_count is 1000, but"),  # a name list of more layers than tensors
        ("llama.expert_count", 2**31 - 1, "llama.expert_count is 2147483647, which the expert tensors do not hold"),
    ],
)
def test_counts_that_would_divide_by_zero_or_explode(seed, tmp_path, key, value, fragment):
    path, data, reader = seed
    at = reader.fields[key].offset + 8 + len(key) + 4  # the u32 value
    bad = bytearray(data)
    bad[at : at + 4] = struct.pack("<I", value)
    refused(tmp_path, bytes(bad), fragment)
