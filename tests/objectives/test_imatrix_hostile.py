"""Hostile imatrix files (``dynsearch apply --imatrix``): GGUF or legacy ``.dat``, a mutated file is
read or refused with one dynsearch error line, never another exception."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from dynsearch.errors import DynsearchError
from dynsearch.objectives.io.imatrix import ImatrixData, ImatrixEntry, read_imatrix, write_imatrix

pytestmark = pytest.mark.timeout(120)


def _data() -> ImatrixData:
    rng = np.random.default_rng(0)
    return ImatrixData({"blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64)) * 10, [10]),
                        "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((3, 32)), [4, 0, 9])},
                       ["calib.txt"], 2, 512)


def _legacy() -> bytes:
    out = [struct.pack("<i", 2)]
    for name, n in (("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 32)):
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", 10, n),
                np.arange(n, dtype="<f4").tobytes()]
    out += [struct.pack("<ii", 3, 9), b"calib.txt"]
    return b"".join(out)


def _mutate(data: bytes, rng: random.Random, header: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(min(header, len(b)))
        r = rng.random()
        if r < 0.4:
            b[at] ^= 1 << rng.randrange(8)
        elif r < 0.7:
            size = rng.choice([4, 8])
            b[at:at + size] = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, 1000]).to_bytes(8, "little")[:size]
        else:
            del b[at:at + rng.randint(1, 16)]
    return bytes(b)


@pytest.mark.parametrize("fmt", ["gguf", "legacy"])
def test_mutated_imatrix_files(tmp_path, fmt):
    src = tmp_path / f"im.{fmt}"
    if fmt == "gguf":
        write_imatrix(src, _data())
    else:
        src.write_bytes(_legacy())
    whole = src.read_bytes()
    assert read_imatrix(src).entries
    header = len(whole) - 4 * (64 + 96 + 4) if fmt == "gguf" else len(whole)
    rng = random.Random(3)
    loaded = rejected = 0
    for i in range(500):
        p = tmp_path / f"m{i}.{fmt}"
        p.write_bytes(_mutate(whole, rng, header))
        try:
            data = read_imatrix(p)
            for name in data.entries:  # usable: llama-quantize's importance, of the right size
                assert data.importance(name).size == data.entries[name].in_sum2.size
            loaded += 1
        except DynsearchError as e:
            assert "\n" not in str(e)
            rejected += 1
        p.unlink()
    print(f"imatrix {fmt}: 500 mutations, {loaded} read, {rejected} refused")
    assert loaded + rejected == 500 and rejected > 50


def test_legacy_sizes_are_checked_before_reading(tmp_path):
    """A legacy file declaring 500 M values was read whole (5.9 GB, 27 s) before any check: now
    each declared size is checked against what the file holds before anything is read."""
    name = b"blk.0.attn_q.weight"
    huge = tmp_path / "huge.dat"
    huge.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 10, 500_000_000)
                     + b"\0" * 4096)
    with pytest.raises(DynsearchError, match="needs 2000000000 bytes, 4096 left"):
        read_imatrix(huge)
    many = tmp_path / "many.dat"
    many.write_bytes(struct.pack("<i", 2**31 - 1) + b"\0" * 100)
    with pytest.raises(DynsearchError, match="declares 2147483647 entries, the file holds at most 6"):
        read_imatrix(many)
    long_name = tmp_path / "name.dat"
    long_name.write_bytes(struct.pack("<ii", 1, 2**31 - 1) + b"x" * 100)
    with pytest.raises(DynsearchError, match="truncated legacy imatrix: entry 0's name needs"):
        read_imatrix(long_name)


@pytest.mark.parametrize("count", [float("inf"), float("nan"), -1.0, 1e30, -0.6])
def test_counts_that_are_no_token_count_are_refused(tmp_path, count):
    """Such counts were silently replaced by all-ones importance (llama-quantize's rule for an
    expert that saw no token): refused with one line naming the tensor."""
    src = tmp_path / "im.gguf"
    write_imatrix(src, _data())
    raw = bytearray(src.read_bytes())
    counts = np.array([4, 0, 9], "<f4").tobytes()  # blk.0.ffn_down_exps.weight.counts, as written
    assert raw.count(counts) == 1
    at = raw.index(counts)
    raw[at + 4:at + 8] = np.array([count], "<f4").tobytes()
    src.write_bytes(bytes(raw))
    with pytest.raises(DynsearchError, match=r"entry blk.0.ffn_down_exps.weight has a token count of "
                                             r"(inf|nan|-1|1e\+30|-0.6), not a whole number") as e:
        read_imatrix(src)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("count", [0.0, 0.4, 1.0, 2.0**53])
def test_counts_in_range_are_read_as_whole_numbers(tmp_path, count):
    src = tmp_path / "im.gguf"
    write_imatrix(src, _data())
    raw = bytearray(src.read_bytes())
    at = raw.index(np.array([4, 0, 9], "<f4").tobytes())
    raw[at + 4:at + 8] = np.array([count], "<f4").tobytes()
    src.write_bytes(bytes(raw))
    assert read_imatrix(src).entries["blk.0.ffn_down_exps.weight"].counts.tolist() == [4, round(count), 9]
