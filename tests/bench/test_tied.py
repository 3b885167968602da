"""``bench tied``: a tied embedding's two roles, each measured apart, against its proxy terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynsearch.bench import tied
from dynsearch.bench.synthetic import Shape, write_synthetic_model
from dynsearch.errors import BenchError
from dynsearch.kernels import dequantize, quantize_tensor
from dynsearch.objectives.evaluate import KLEvaluator, QuantizedWeights
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.prepare import RunModel, prepare

TYPES = ("Q4_K", "Q6_K", "Q8_0")


def _prepared(path, out):
    rc = RunConfig.parse(str(path), ["8bpw"], TYPES, calib_tokens=256, fisher_tokens=128, search_tokens=128,
                         eval_tokens=128, seq_len=64, out=str(out))
    return prepare(rc, RunModel.open(rc.model), progress=False)


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def prep(tmp_path_factory, demo_model):
    d = tmp_path_factory.mktemp("tied")
    shape = Shape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=49152, tied=True)
    return _prepared(write_synthetic_model(d / "m.gguf", shape, seed=5, tokenizer_from=demo_model), d / "run")


def test_each_role_is_measured_apart_as_a_plain_forward_measures_it(prep):
    rows = tied.role_rows(prep, ("Q4_K", "Q8_0"), progress=False)
    fwd, src = prep.forward, prep.source
    w = src.load(tied.EMBD)
    norm = torch.as_tensor(src.load("output_norm.weight"))
    tokens = prep.search_tokens
    ref_hidden = fwd.hidden_states(tokens)

    def logits(hidden, table):  # output norm and head, written out here (no head_rows / _pairs)
        x = hidden.double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + fwd.cfg.rms_eps) * norm.double()
        return (x @ torch.as_tensor(table).double().T).reshape(-1, table.shape[0])

    ref = logits(ref_hidden, w)
    for r in rows:
        dq = dequantize(quantize_tensor(w, r.qtype, prep.importance.get(tied.EMBD)), r.qtype, w.shape[-1]).reshape(w.shape)
        hidden = fwd.hidden_states(tokens, {tied.EMBD: dq})
        assert r.kl_head == pytest.approx(_kl(ref, logits(ref_hidden, dq)), rel=2e-3)
        assert r.kl_lookup == pytest.approx(_kl(ref, logits(hidden, w)), rel=2e-3)
        assert r.kl_both == pytest.approx(_kl(ref, logits(hidden, dq)), rel=2e-3)
        # the written file's KL is what the search measures for an assignment of the embedding alone
        ev = KLEvaluator(fwd, tokens)
        alone = ev.mean_kl(QuantizedWeights(src, {tied.EMBD: r.qtype}, prep.importance.get))
        assert r.kl_both == pytest.approx(alone, rel=1e-6)
        e, j = prep.space.names.index(tied.EMBD), prep.space.types.index(r.qtype)
        assert r.proxy_head + r.proxy_lookup == pytest.approx(prep.space.errors[e, j], rel=1e-9)
        assert r.proxy_head > 0 and r.proxy_lookup > 0 and r.kl_head > 0 and r.kl_lookup > 0
    assert rows[0].kl_both > rows[1].kl_both  # Q4_K loses more than Q8_0
    text = tied.format_rows(rows)
    assert "Q4_K" in text and "geometric means" in text


def test_untied_model_and_unknown_type_are_refused(tmp_path, demo_model, prep):
    with pytest.raises(BenchError, match="not among the run's candidates"):
        tied.role_rows(prep, ("Q2_K",), progress=False)
    shape = Shape(n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=49152, tied=False)
    untied = _prepared(write_synthetic_model(tmp_path / "u.gguf", shape, seed=1, tokenizer_from=demo_model),
                       tmp_path / "run")
    with pytest.raises(BenchError, match="not tied"):
        tied.role_rows(untied, ("Q8_0",), progress=False)
    assert np.isfinite(untied.space.errors).any()
