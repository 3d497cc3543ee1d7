"""The packed cache value (proxy/stores/entrycodec.py): every float32 bit and the count come back, for every size;
what is not a value of the asked size, including the previous layout, is a miss."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from proxy.mock.upstream import vector_for
from proxy.stores.entrycodec import HEAD, PACKED_TAG, RAW_TAG, Entry, decode_entries, decode_entry, encode_entries
from proxy.stores.localcache import LocalCache, entry_cost

DIMS = [*range(1, 80), 96, 127, 128, 255, 256, 257, 384, 512, 768, 1000, 1024, 1536, 2048, 3071, 3072]
COUNTS = [0, 1, 255, 256, 8191, 65535, 65536, 2**32 - 1]


def normalized(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    v = rng.standard_normal((n, dims), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def adversarial(rng: np.random.Generator, dims: int) -> list[np.ndarray]:
    """Float32 patterns that must round-trip too: zeros of both signs, subnormals, extremes, inf, NaN payloads."""
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38, np.inf, -np.inf],
                       dtype="<f4")
    nan_payloads = np.array([0x7FC00001, 0xFFBFFFFF, 0x7F800001], dtype="<u4").view("<f4")
    cases = [
        np.zeros(dims, dtype="<f4"),
        np.full(dims, -0.0, dtype="<f4"),
        rng.integers(0, 2**32, dims, dtype=np.uint64).astype("<u4").view("<f4"),  # any bit pattern
        np.resize(np.concatenate([special, nan_payloads]), dims).astype("<f4"),
        (normalized(rng, 1, dims)[0] * np.float32(1e30)).astype("<f4"),  # huge, narrow spread: still packs
        (normalized(rng, 1, dims)[0] * np.float32(1e-30)).astype("<f4"),  # tiny, narrow spread: still packs
    ]
    mixed = normalized(rng, 1, dims)[0]
    mixed[-1] = -0.0  # level 0 among levels near 60: packs only when it is not among the first 64 floats
    cases.append(mixed)
    return cases


def same_bits(entry: Entry | None, vector: np.ndarray, tokens: int) -> bool:
    return entry is not None and bytes(entry.vector) == vector.astype("<f4").tobytes() and entry.tokens == tokens


@pytest.mark.parametrize("dims", DIMS)
def test_every_float32_bit_and_the_count_come_back(dims: int) -> None:
    rng = np.random.default_rng(dims)
    vecs = [*normalized(rng, 8, dims), *adversarial(rng, dims)]
    counts = [COUNTS[i % len(COUNTS)] for i in range(len(vecs))]
    entries = [Entry(v.tobytes(), c) for v, c in zip(vecs, counts, strict=True)]
    values = encode_entries(entries)  # a batch: numpy packs the heads together
    assert [encode_entries([e])[0] for e in entries] == values  # one at a time: plain Python, the same bytes
    decoded = decode_entries(values, dims)  # one batch: packed and raw values mixed
    assert all(same_bits(d, v, c) for d, v, c in zip(decoded, vecs, counts, strict=True))
    assert all(same_bits(decode_entry(x, dims), v, c) for x, v, c in zip(values, vecs, counts, strict=True))
    if dims >= HEAD:  # heads whose magnitudes lie within 2^32 of each other pack (all-zero ones too); others do not
        mixed = PACKED_TAG if dims > HEAD else RAW_TAG
        assert [x[0] for x in values] == [PACKED_TAG] * 10 + [RAW_TAG] * 2 + [PACKED_TAG] * 2 + [mixed]
        assert {len(x) for x in values[:8]} == {4 * dims + 4 - 22}
    else:
        assert {x[0] for x in values} == {RAW_TAG}


def test_vectors_from_memoryviews_and_the_mock_upstream_pack() -> None:
    rows = np.stack([vector_for("text-embedding-3-small", [k, 7], 1536, None) for k in range(50)])
    view = np.ascontiguousarray(rows, dtype="<f4").data.cast("B")  # as the service hands over an upstream answer
    entries = [Entry(view[i * 6144:(i + 1) * 6144], 3 + i) for i in range(50)]
    values = encode_entries(entries)
    assert {(x[0], len(x)) for x in values} == {(PACKED_TAG, 6126)}
    decoded = decode_entries(values, 1536)
    assert all(same_bits(d, r, 3 + i) for i, (d, r) in enumerate(zip(decoded, rows, strict=True)))


def test_wrong_sizes_garbage_and_none_are_misses() -> None:
    rng = np.random.default_rng(1)
    v = normalized(rng, 1, 256)[0]
    wide = v.copy()
    wide[0] = 1e-30  # 2^-100 among values near 2^-5: the head does not pack
    packed, raw = encode_entries([Entry(v.tobytes(), 5), Entry(wide.tobytes(), 5)])
    assert packed[0] == PACKED_TAG and raw[0] == RAW_TAG
    values = [packed, None, b"", packed[:-1], packed + b"\0", raw[:-1], b"\x00" + packed[1:], raw]
    got = decode_entries(values, 256)
    assert got[0] is not None and got[-1] is not None
    assert got[1:-1] == [None] * 6
    fast = decode_entries([packed] * 6, 256)  # more than a few, all present and of one size: the batch path
    assert fast[0] is not None and fast[0] == fast[5] and fast[0].tokens == 5
    assert bytes(fast[0].vector) == v.tobytes() and isinstance(fast[0].vector, memoryview)
    retagged = decode_entries([packed] * 5 + [b"\xb2" + packed[1:]], 256)  # the last one is not packed after all
    assert retagged[:5] == fast[:5] and retagged[5] is None
    assert decode_entries([packed, raw], 255) == [None, None]  # the same values read as another size
    assert decode_entries([packed, raw], 257) == [None, None]


@pytest.mark.parametrize("dims", [1, 3, 63, 64, 65, 256, 1536, 3072])
def test_the_previous_layout_is_never_decoded(dims: int) -> None:
    """Count (4 bytes) + raw vector, as the previous version wrote it: whatever its first byte (the count's low
    byte, so also the two tags), no value of that layout decodes, for its own size or a neighbour's."""
    v = normalized(np.random.default_rng(dims), 1, dims)[0].tobytes()
    old = [count.to_bytes(4, "little") + v for count in range(256)] + [(PACKED_TAG | 0xB200).to_bytes(4, "little") + v]
    for d in {dims - 1, dims, dims + 1} - {0}:
        assert decode_entries(old, d) == [None] * len(old)


def test_encode_refuses_a_count_that_does_not_fit() -> None:
    with pytest.raises(struct.error):
        encode_entries([Entry(bytes(4), 2**32)])


def test_the_in_process_tier_keeps_its_own_copy_of_a_batch_decoded_entry() -> None:
    """Packed values of a batch are decoded into one buffer; an entry kept in process must not hold it alive."""
    rng = np.random.default_rng(2)
    vecs = normalized(rng, 8, 1536)
    decoded = decode_entries(encode_entries([Entry(v.tobytes(), 1) for v in vecs]), 1536)
    assert decoded[0] is not None and isinstance(decoded[0].vector, memoryview)
    local = LocalCache(10 * 1024 * 1024, 60)
    local.put("k", decoded[0])
    kept = local.get("k")
    assert kept is not None and isinstance(kept.vector, bytes)
    assert kept.vector == vecs[0].tobytes() and kept.tokens == 1
    assert local.bytes == entry_cost("k", kept.vector)  # its own bytes, not the batch's buffer
