"""The value of one cache entry in Redis (its key: rediskeys.py, the `emb:v2` namespace), losslessly packed.

    packed form (vectors of 64 floats or more):  0xA2 | token count (4 bytes) | head (233 bytes) | floats 64.. raw
    raw form (anything else):                    0xB2 | token count (4 bytes) | every float raw

Floats are little-endian float32, the token count a little-endian uint32. The head holds the first 64 floats in
233 bytes instead of 256. A float's top byte is its sign and the top 7 bits of its exponent (its "level"); in an
embedding the levels of 64 floats lie within 16 of each other (magnitudes within 2^32). Head: the lowest level
(1 byte), the 64 signs (8 bytes; bit i of byte j is float 8j+i), each level minus the lowest (4 bits; float 2j in
the low nibble of byte j), bytes 0-1 of every float (128 bytes), byte 2 of every float (64 bytes): planes of 2 and
1 bytes, which numpy interleaves at memory speed (3-byte groups are many times slower). The raw form is for
vectors under 64 floats and heads that do not pack (levels more than 15 apart: a zero or subnormal among normal
values, a NaN or inf, magnitudes spread over more than 2^32).

Why only 64 floats: Redis allocates a value in jemalloc's size classes (..., 5,120, 6,144, 7,168 bytes, ...). A
1536-d vector is exactly 6,144 bytes, so with any header its value lands in the 7,168 class; 22 bytes less puts it
in the 6,144 one (`MEMORY USAGE` 7,256 -> 6,232 B), and likewise for 256, 3072 and other multiples of 64 dims.
Packing every float this way (29 bits a float, 5,572 B for 1536-d) lands in the same class while its decode costs
about three times as much; the 5,120 class would need about the entropy of a real vector (26.5 bits a float),
out of reach of a vectorized decode. Nothing is lost: every bit of every float and the count come back.

A value is decoded only as the dimensions it was written for (its tag and length fix them). No length of either
form equals the previous layout's (4 + 4 x dims): a value of that layout is never mis-read, wherever it is found.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

HEAD = 64  # floats packed at the front of a vector
_HEAD_BYTES = 4 * HEAD
_PACKED = 1 + HEAD // 8 + HEAD // 2 + 3 * HEAD  # 233: lowest level, signs, level offsets, bytes 0-1, byte 2
_SIGNS, _CODES, _LOW, _B2 = 1, 1 + HEAD // 8, 1 + HEAD // 8 + HEAD // 2, 1 + HEAD // 8 + HEAD // 2 + 2 * HEAD
_FRONT = 1 + 4 + _PACKED  # tag, count, packed head
_GAP = _HEAD_BYTES - _FRONT  # 18: what a packed value is shorter than its vector
PACKED_TAG, RAW_TAG = 0xA2, 0xB2
_COUNT = struct.Struct("<I")
_SMALL = 4  # batches up to this size are packed and unpacked in plain Python: numpy's fixed cost is ~12 us a call
_AT = 5  # where the packed head starts in a value: after tag and count
# translate() tables for the plain-Python path
_LEVEL = bytes(b & 0x7F for b in range(256))
_SIGN_BIT = bytes(b >> 7 for b in range(256))
_MINUS = [bytes((b - lowest) & 0xFF for b in range(256)) for lowest in range(128)]
_LOW_NIBBLE_PLUS = [bytes(((b & 15) + lowest) & 0x7F for b in range(256)) for lowest in range(128)]
_HIGH_NIBBLE_PLUS = [bytes(((b >> 4) + lowest) & 0x7F for b in range(256)) for lowest in range(128)]
_SIGNS_OF = [bytes(0x80 * ((b >> i) & 1) for i in range(8)) for b in range(256)]
# byte of two 4-bit codes -> the two codes as two bytes (little-endian uint16)
_NIBBLES = np.array([(b & 15) | (b >> 4) << 8 for b in range(256)], dtype="<u2")
# byte of 8 sign bits -> 8 bytes, each 0x80 or 0 (little-endian uint64)
_SIGN_BYTES = np.array([sum(((b >> i) & 1) << (8 * i + 7) for i in range(8)) for b in range(256)], dtype="<u8")


@dataclass(frozen=True, slots=True)
class Entry:
    # little-endian float32. Read from the cache: a view into the value read (raw form), into the one buffer a
    # batch of more than 4 was decoded into (the in-process tier keeps its own copy), or its own bytes.
    vector: bytes | memoryview
    tokens: int


def _pack_heads(vectors: Sequence[bytes | memoryview]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The packed heads (one row per vector) and whether each vector's head packs at all."""
    heads = np.frombuffer(b"".join([v[:_HEAD_BYTES] for v in vectors]), dtype=np.uint8).reshape(-1, HEAD, 4)
    top = heads[:, :, 3]
    level = top & 0x7F
    lowest = level.min(axis=1)
    fits = level.max(axis=1) - lowest <= 15
    codes = level - lowest[:, None]
    out = np.empty((len(heads), _PACKED), dtype=np.uint8)
    out[:, 0] = lowest
    out[:, _SIGNS:_CODES] = np.packbits(top >> 7, axis=1, bitorder="little")
    out[:, _CODES:_LOW] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out[:, _LOW:_B2] = heads[:, :, :2].reshape(-1, 2 * HEAD)
    out[:, _B2:] = heads[:, :, 2]
    return out, fits


def _unpack_heads(rows: npt.NDArray[np.uint8]) -> None:
    """Unpack each row's head, found after its gap, tag and count, over the row's first 256 bytes."""
    packed = rows[:, _GAP + 5:_HEAD_BYTES]
    top = _NIBBLES[packed[:, _CODES:_LOW]].view(np.uint8)
    top += packed[:, :1]
    top |= _SIGN_BYTES[packed[:, _SIGNS:_CODES]].view(np.uint8)
    low = packed[:, _LOW:_B2].copy().view("<u2")
    b2 = packed[:, _B2:].copy()
    heads = rows[:, :_HEAD_BYTES].reshape(len(rows), HEAD, 4)  # a view: written only once everything is read
    heads.view("<u2")[:, :, 0] = low
    heads[:, :, 2] = b2
    heads[:, :, 3] = top


def _pack_head(vector: bytes | memoryview) -> bytes | None:
    """One vector's packed head, or None if it does not pack: `_pack_heads` in plain Python, byte for byte."""
    head = bytes(memoryview(vector)[:_HEAD_BYTES])
    top = head[3::4]
    level = top.translate(_LEVEL)
    lowest = min(level)
    if max(level) - lowest > 15:
        return None
    codes = level.translate(_MINUS[lowest])
    nibbles = int.from_bytes(codes[0::2], "little") | int.from_bytes(codes[1::2], "little") << 4
    bits = top.translate(_SIGN_BIT)
    signs = sum(int.from_bytes(bits[k::8], "little") << k for k in range(8))
    low = bytearray(2 * HEAD)
    low[0::2] = head[0::4]
    low[1::2] = head[1::4]
    return b"".join((bytes((lowest,)), signs.to_bytes(HEAD // 8, "little"), nibbles.to_bytes(HEAD // 2, "little"),
                     low, head[2::4]))


def _unpack_one(value: bytes) -> Entry:
    """One packed value's entry: `_decode_packed` in plain Python, for a few values (its own bytes)."""
    lowest, codes = value[_AT], value[_AT + _CODES:_AT + _LOW]
    level = bytearray(HEAD)
    level[0::2] = codes.translate(_LOW_NIBBLE_PLUS[lowest])
    level[1::2] = codes.translate(_HIGH_NIBBLE_PLUS[lowest])
    signs = b"".join([_SIGNS_OF[b] for b in value[_AT + _SIGNS:_AT + _CODES]])
    top = (int.from_bytes(level, "little") | int.from_bytes(signs, "little")).to_bytes(HEAD, "little")
    head = bytearray(_HEAD_BYTES)
    head[0::4] = value[_AT + _LOW:_AT + _B2:2]
    head[1::4] = value[_AT + _LOW + 1:_AT + _B2:2]
    head[2::4] = value[_AT + _B2:_FRONT]
    head[3::4] = top
    return Entry(bytes(head) + memoryview(value)[_FRONT:], _COUNT.unpack_from(value, 1)[0])


def encode_entries(entries: Sequence[Entry]) -> list[bytes]:
    """The stored values of `entries` (any mix of sizes): the heads of a batch are packed together."""
    at = [i for i, e in enumerate(entries) if len(e.vector) >= _HEAD_BYTES]
    heads: dict[int, bytes | None] = {}
    if len(at) > _SMALL:
        packed, fits = _pack_heads([entries[i].vector for i in at])
        heads = {i: packed[j].tobytes() for j, i in enumerate(at) if fits[j]}
    else:
        heads = {i: _pack_head(entries[i].vector) for i in at}
    packed_tag, raw_tag, count = bytes((PACKED_TAG,)), bytes((RAW_TAG,)), _COUNT.pack
    values: list[bytes] = []
    for i, e in enumerate(entries):
        head = heads.get(i)
        if head is not None:
            values.append(b"".join((packed_tag, count(e.tokens), head, memoryview(e.vector)[_HEAD_BYTES:])))
        else:
            values.append(b"".join((raw_tag, count(e.tokens), e.vector)))
    return values


def encode_entry(entry: Entry) -> bytes:
    return encode_entries([entry])[0]


def decode_entries(values: Sequence[bytes | None], dims: int) -> list[Entry | None]:
    """One entry per value; None where the value is missing or not an entry of `dims` floats (a miss).

    The packed values of a batch are decoded together, in place: joined with an 18-byte gap before each, they
    become the batch's vectors back to back once each head is unpacked over its gap, tag, count and packed head
    (a few numpy passes over the batch's heads). The join is the one copy; entries are views into it. Up to 4 are
    decoded one by one in plain Python."""
    width = 4 * dims
    packed_size = width - _GAP
    if dims >= HEAD and len(values) > _SMALL and None not in values:  # the usual batch: all packed, one path
        present = cast("Sequence[bytes]", values)
        if set(map(len, present)) == {packed_size}:
            every = _decode_packed(present, width)
            if every is not None:
                return every
    out: list[Entry | None] = [None] * len(values)
    raw_size = width + 5
    packed: list[bytes] = []
    at: list[int] = []
    unpack = _COUNT.unpack_from
    for i, v in enumerate(values):
        if v is None:
            continue
        n = len(v)
        if n == packed_size and v[0] == PACKED_TAG and dims >= HEAD:
            packed.append(v)
            at.append(i)
        elif n == raw_size and v[0] == RAW_TAG:
            out[i] = Entry(memoryview(v)[5:], unpack(v, 1)[0])
    if len(packed) > _SMALL:
        entries = _decode_packed(packed, width)
        assert entries is not None  # every tag was checked
        for i, e in zip(at, entries, strict=True):
            out[i] = e
    else:
        for i, v in zip(at, packed, strict=True):
            out[i] = _unpack_one(v)
    return out


def _decode_packed(values: Sequence[bytes], width: int) -> list[Entry | None] | None:
    """Entries of packed values of one size; None if any of them does not carry the packed tag."""
    buf = bytearray(_GAP).join([b"", *values])
    rows = np.frombuffer(buf, dtype=np.uint8).reshape(len(values), width)
    if not (rows[:, _GAP] == PACKED_TAG).all():
        return None
    counts = rows[:, _GAP + 1:_GAP + 5].copy().view("<u4").ravel().tolist()
    _unpack_heads(rows)
    view = memoryview(buf)
    out: list[Entry | None] = [Entry(view[at:at + width], n) for at, n in zip(range(0, len(buf), width), counts,
                                                                                strict=True)]
    return out


def decode_entry(value: bytes, dims: int) -> Entry | None:
    """The entry, or None when the value is not a well-formed `dims`-sized entry (treated as a miss)."""
    return decode_entries([value], dims)[0]


__all__ = ["HEAD", "PACKED_TAG", "RAW_TAG", "Entry", "decode_entries", "decode_entry", "encode_entries",
           "encode_entry"]
