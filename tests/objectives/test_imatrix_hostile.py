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
