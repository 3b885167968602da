"""QuantizedWeights and its cache of quantized bytes."""

import numpy as np

from dynsearch.kernels import dequantize, quantize
from dynsearch.objectives.evaluate import QuantCache, QuantizedWeights


class _Source:
    def __init__(self, tensors):
        self.tensors = tensors
        self.loads = 0

    def load(self, name):
        self.loads += 1
        return self.tensors[name]

    def shape(self, name):
        return self.tensors[name].shape


def _source():
    rng = np.random.default_rng(0)
    return _Source({"a": rng.standard_normal((8, 64)).astype(np.float32),
                    "b": rng.standard_normal((4, 96)).astype(np.float32),
                    "n": rng.standard_normal(64).astype(np.float32)})


def test_values_are_the_written_file_with_and_without_cache():
    src = _source()
    imp = {"a": np.linspace(0.5, 2, 64, dtype=np.float32)}
    assign = {"a": "Q4_0", "b": "Q8_0", "n": "F32"}
    cache = QuantCache()
    for qw in (QuantizedWeights(src, assign, imp.get), QuantizedWeights(src, assign, imp.get, cache)):
        exp_a = dequantize(quantize(src.tensors["a"], "Q4_0", imp["a"]), "Q4_0", 64).reshape(8, 64)
        np.testing.assert_array_equal(qw["a"], exp_a)
        exp_b = dequantize(quantize(src.tensors["b"], "Q8_0"), "Q8_0", 96).reshape(4, 96)
        np.testing.assert_array_equal(qw["b"], exp_b)
        np.testing.assert_array_equal(qw["n"], src.tensors["n"])
    assert sorted(QuantizedWeights(src, assign)) == ["a", "b", "n"]


def test_cache_reuses_quantized_bytes_across_assignments():
    src = _source()
    cache = QuantCache()
    first = QuantizedWeights(src, {"a": "Q4_0", "b": "Q8_0"}, cache=cache)
    x1 = first["a"], first["b"]
    loads = src.loads
    second = QuantizedWeights(src, {"a": "Q4_0", "b": "Q5_0"}, cache=cache)
    np.testing.assert_array_equal(second["a"], x1[0])  # from the cache: no load
    assert src.loads == loads
    second["b"]  # a new pair: quantized
    assert src.loads == loads + 1
    assert (cache.hits, cache.misses) == (1, 3)


def test_cache_drops_least_recently_used_past_its_cap():
    src = _source()
    q_a = quantize(src.tensors["a"], "Q8_0")
    cache = QuantCache(max_bytes=2 * q_a.nbytes)
    qw = {t: QuantizedWeights(src, {"a": t}, cache=cache) for t in ("Q8_0", "Q5_0", "Q4_0")}
    qw["Q8_0"]["a"]
    qw["Q5_0"]["a"]
    qw["Q8_0"]["a"]  # refresh: Q5_0 is now the oldest
    qw["Q4_0"]["a"]
    assert cache._bytes <= cache.max_bytes
    assert ("a", "Q8_0") in cache._items and ("a", "Q5_0") not in cache._items
    too_big = QuantCache(max_bytes=10)
    QuantizedWeights(src, {"a": "Q8_0"}, cache=too_big)["a"]
    assert not too_big._items


def test_interleaved_head_generators_leave_grad_mode_alone(tmp_path):
    """KL evaluation zips two ``head`` generators; neither may leave inference mode on."""
    import torch

    from dynsearch.bench.synthetic import Shape, write_synthetic_model
    from dynsearch.objectives.forward import BlockwiseForward
    from dynsearch.objectives.io.gguf_source import GGUFSource

    path = write_synthetic_model(tmp_path / "m.gguf", Shape(n_layer=1, n_embd=64, n_ff=128, n_head=4,
                                                            n_head_kv=2, n_vocab=100))
    fwd = BlockwiseForward(GGUFSource(path), batch_size=1)
    h = fwd.hidden_states(np.random.default_rng(0).integers(0, 100, (3, 8)))
    for _ in zip(fwd.head(h), fwd.head(h, log_probs=True)):
        assert torch.is_grad_enabled()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    gen = fwd.head(h)
    next(gen)  # a suspended generator too
    assert torch.is_grad_enabled()
