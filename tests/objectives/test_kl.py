"""KL statistics (objectives/kl.py) against brute force and against llama-perplexity --kl-divergence."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from dynsearch.bench import llamacpp
from dynsearch.objectives import kl


def _logits(n: int, v: int, seed: int, noise: float = 0.3, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n, v)) * scale
    cand = ref + rng.standard_normal((n, v)) * noise
    tgt = rng.integers(0, v, n)
    return ref.astype(np.float32), cand.astype(np.float32), tgt


def _brute_kld(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    lp = scipy.special.log_softmax(ref.astype(np.float64), axis=1)
    lq = scipy.special.log_softmax(cand.astype(np.float64), axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(lp > -np.inf, np.exp(lp) * (lp - lq), 0.0).sum(axis=1)


def _brute(ref: np.ndarray, cand: np.ndarray, tgt: np.ndarray) -> dict[str, float]:
    """llama-perplexity's formulas written out independently with scipy, in float64."""
    lp = scipy.special.log_softmax(ref.astype(np.float64), axis=1)
    lq = scipy.special.log_softmax(cand.astype(np.float64), axis=1)
    p, q = np.exp(lp), np.exp(lq)
    kld = _brute_kld(ref, cand)
    rows = np.arange(len(tgt))
    nll_q, nll_b = -lq[rows, tgt], -lp[rows, tgt]
    dp = q[rows, tgt] - p[rows, tgt]
    n = len(tgt)
    se = lambda x: np.std(x) / math.sqrt(n - 1)  # noqa: E731  (llama.cpp: population std / sqrt(n-1))
    ln_ratio = nll_q.mean() - nll_b.mean()
    cov = np.cov(nll_q, nll_b, ddof=0)[0, 1] / (n - 1)
    same = float(np.mean(q.argmax(1) == p.argmax(1)))
    return {
        "kld_mean": kld.mean(), "kld_mean_err": se(kld), "kld_median": np.median(kld), "kld_max": kld.max(),
        "kld_min": kld.min(), "kld_p99": np.percentile(kld, 99), "kld_p90": np.percentile(kld, 90),
        "kld_p0_1": np.percentile(kld, 0.1),
        "ppl_q": math.exp(nll_q.mean()), "ppl_base": math.exp(nll_b.mean()),
        "ppl_ratio": math.exp(ln_ratio), "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_err": math.sqrt(se(nll_q) ** 2 + se(nll_b) ** 2 - 2 * cov),
        "cor_ln_ppl": scipy.stats.pearsonr(nll_q, nll_b)[0],
        "dp_mean": dp.mean(), "dp_rms": math.sqrt(np.mean(dp**2)), "dp_p5": np.percentile(dp, 5),
        "same_top_p": same, "same_top_p_err": math.sqrt(same * (1 - same) / (n - 1)),
    }


# ------------------------------------------------------------------------------- closed form


def test_identical_logits_give_zero_kl():
    ref, _, tgt = _logits(200, 64, seed=1)
    s = kl.kl_stats(ref, ref, tgt)
    assert s.kld_mean == pytest.approx(0.0, abs=1e-12)
    assert s.kld_max == pytest.approx(0.0, abs=1e-12)
    assert s.same_top_p == 1.0 and s.same_top_p_err == 0.0
    assert s.ppl_ratio == pytest.approx(1.0, abs=1e-12)
    assert s.dp_rms == pytest.approx(0.0, abs=1e-12)
    assert s.cor_ln_ppl == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n,v,noise,seed", [(50, 5, 1.0, 2), (300, 97, 0.3, 3), (1000, 32, 2.0, 4)])
def test_matches_brute_force(n, v, noise, seed):
    ref, cand, tgt = _logits(n, v, seed, noise)
    d = kl.kl_stats(ref, cand, tgt).to_dict()
    for key, want in _brute(ref, cand, tgt).items():
        assert d[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key


def test_two_token_distribution_closed_form():
    # p = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    ref = np.zeros((20, 2))
    cand = np.tile([0.0, math.log(3.0)], (20, 1))
    s = kl.kl_stats(ref, cand, np.zeros(20, dtype=np.int64))
    assert s.kld_mean == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    assert s.ppl_ratio == pytest.approx(2.0, rel=1e-12)  # p_Q(token 0) = 1/4 vs 1/2
    assert s.dp_mean == pytest.approx(-0.25, rel=1e-12)
    assert s.same_top_p == 0.0  # argmax: 0 (first of a tie) vs 1


def test_invariant_to_logit_shifts():
    ref, cand, tgt = _logits(256, 50, seed=5)
    rng = np.random.default_rng(6)
    a = kl.kl_stats(ref, cand, tgt).to_dict()
    b = kl.kl_stats(ref + rng.normal(0, 100, (256, 1)), cand - rng.normal(0, 100, (256, 1)), tgt).to_dict()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_streaming_equals_one_shot():
    ref, cand, tgt = _logits(700, 40, seed=7)
    one = kl.kl_stats(ref, cand, tgt).to_dict()
    acc = kl.KLAccumulator(block_rows=33)
    for lo, hi in [(0, 1), (1, 250), (250, 256), (256, 700)]:
        acc.update(torch.from_numpy(ref[lo:hi]), cand[lo:hi], tgt[lo:hi])  # numpy and torch mixed
    assert acc.count == 700
    assert acc.result().to_dict() == pytest.approx(one, rel=1e-12, abs=1e-15)
    # merge of two accumulators
    a, b = kl.KLAccumulator(), kl.KLAccumulator()
    a.update(ref[:300], cand[:300], tgt[:300])
    b.update(ref[300:], cand[300:], tgt[300:])
    a.merge(b)
    assert a.result().to_dict() == pytest.approx(one, rel=1e-12, abs=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    ref, cand, tgt = _logits(300, 1000, seed=12)
    want = kl.kl_stats(ref, cand, tgt).to_dict()
    dev = torch.device("cuda")
    got = kl.kl_stats(torch.from_numpy(ref).to(dev), torch.from_numpy(cand).to(dev), tgt).to_dict()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    ref_logp = torch.log_softmax(torch.from_numpy(ref).double(), -1).to(dev)
    assert kl.mean_kl(ref_logp, torch.from_numpy(cand).to(dev)) == pytest.approx(want["kld_mean"], rel=1e-5)


def test_masked_and_extreme_logits():
    ref, cand, tgt = _logits(64, 16, seed=8, scale=1e3)  # very peaked: stable log-softmax needed
    ref[:, 5] = -np.inf  # a vocabulary entry the reference never emits
    tgt[tgt == 5] = 0
    with np.errstate(all="ignore"):
        s = kl.kl_stats(ref, cand, tgt)  # perplexities overflow to inf here: that is the right answer
    assert np.isfinite(s.kld_mean) and s.kld_min >= 0
    assert s.kld_mean == pytest.approx(_brute_kld(ref, cand).mean(), rel=1e-9)
    cand2 = ref.copy()
    cand2[:, ref[0].argmax()] = -np.inf  # candidate rules out a token the reference likes
    acc = kl.KLAccumulator()
    acc.update(ref[:1], cand2[:1], tgt[:1])
    assert acc.values()["kld"][0] == math.inf


def test_top_k_reference():
    ref, cand, tgt = _logits(200, 30, seed=9, noise=0.5)
    full = kl.kl_stats(ref, cand, tgt)
    # k = V is the full distribution
    assert kl.kl_stats(ref, cand, tgt, top_k=30).kld_mean == pytest.approx(full.kld_mean, rel=1e-9)
    # small k: KL of the coarsened distribution {top-k, rest}, brute force; a lower bound of the full KL
    k = 4
    p = scipy.special.softmax(ref.astype(np.float64), 1)
    q = scipy.special.softmax(cand.astype(np.float64), 1)
    idx = np.argsort(-p, axis=1)[:, :k]
    pk, qk = np.take_along_axis(p, idx, 1), np.take_along_axis(q, idx, 1)
    pc = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qc = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    want = scipy.special.rel_entr(pc, qc).sum(1)
    acc = kl.KLAccumulator(top_k=k)
    acc.update(ref, cand, tgt)
    got = acc.values()["kld"]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)
    assert np.all(got <= scipy.special.rel_entr(p, q).sum(1) + 1e-12)
    # a precomputed TopKRef gives the same, and keeps the exact target NLL / same-top
    tk = kl.top_k_ref(ref, tgt, k)
    s = kl.kl_stats(tk, cand, tgt)
    assert s.kld_mean == pytest.approx(float(want.mean()), rel=1e-9)
    assert s.ppl_base == pytest.approx(full.ppl_base, rel=1e-12)
    assert s.same_top_p == full.same_top_p


def test_mean_kl_matches_accumulator():
    ref, cand, tgt = _logits(128, 100, seed=10)
    want = kl.kl_stats(ref, cand, tgt).kld_mean
    ref_logp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    assert kl.mean_kl(ref_logp, torch.from_numpy(cand)) == pytest.approx(want, rel=1e-5)
    assert kl.mean_kl(ref_logp, torch.from_numpy(cand), dtype=torch.float64) == pytest.approx(want, rel=1e-12)
    tk = kl.top_k_ref(ref, tgt, 100)
    assert kl.mean_kl(tk, torch.from_numpy(cand), dtype=torch.float64) == pytest.approx(want, rel=1e-9)


def test_mc_flips():
    ref = [[0.1, 0.5, 0.2], [1.0, 0.0], [0.3, 0.3, 0.9, 0.1], [2.0, 1.0]]
    cand = [[0.6, 0.5, 0.2], [1.0, 0.0], [0.3, 0.3, 0.1, 0.1], [2.0, 1.0]]
    f = kl.mc_flips(ref, cand, labels=[1, 0, 0, 1])
    assert (f.n_questions, f.n_flips, f.flip_rate) == (4, 2, 0.5)
    assert f.ref_choice.tolist() == [1, 0, 2, 0] and f.cand_choice.tolist() == [0, 0, 0, 0]
    assert (f.acc_ref, f.acc_cand, f.right_to_wrong, f.wrong_to_right) == (0.5, 0.5, 1, 1)
    with pytest.raises(ValueError):
        kl.mc_flips([[1, 2]], [[1, 2, 3]])


def test_chunks_like_llama_perplexity():
    toks = np.arange(1, 2600)
    ch = kl.perplexity_chunks(toks, 512, bos_token=0, n_chunks=4)
    assert ch.shape == (4, 512) and (ch[:, 0] == 0).all()
    assert (ch[1, 1:] == toks[513:1024]).all()
    assert kl.perplexity_chunks(toks, 512, None).shape == (5, 512)
    sl = kl.scored_positions(512)
    assert (sl.start, sl.stop) == (256, 511)
    assert (kl.scored_targets(ch)[2] == toks[2 * 512 + 257: 3 * 512]).all()
    with pytest.raises(ValueError):
        kl.perplexity_chunks(toks[:1000], 512, 0)


def test_parser_round_trips_table():
    ref, cand, tgt = _logits(300, 50, seed=11)
    s = kl.kl_stats(ref, cand, tgt)
    parsed = llamacpp.parse_kl_printout(s.table())
    d = s.to_dict()
    assert set(parsed) == set(d) - {"n_tokens"}
    for key, v in parsed.items():  # printed with 6 decimals, 3 for percent, 2 for the correlation's percent
        tol = 6e-5 if key == "cor_ln_ppl" else 6e-6 if key.startswith(("dp", "same")) else 6e-7
        assert v == pytest.approx(d[key], abs=tol), key
    with pytest.raises(ValueError):
        llamacpp.parse_kl_printout("perplexity: 13.5 [114/114]")


# ------------------------------------------------------------------- against llama-perplexity


N_CTX, N_CHUNKS = 512, 5
KEYS = ["kld_mean", "kld_median", "kld_p90", "kld_p95", "kld_p99", "same_top_p", "ppl_ratio", "ln_ppl_ratio",
        "ppl_q", "ppl_base", "dp_rms", "cor_ln_ppl"]


def _corpus(min_chars: int = 24_000) -> str:
    """Deterministic English text: Python's own help topics (pydoc_data), in sorted order."""
    from pydoc_data.topics import topics

    parts, n = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        n += len(topics[key])
        if n >= min_chars:
            break
    return "\n".join(parts)


def _run(cmd: list) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module", params=["Q2_K", "Q4_K_M"])
def kld_run(request, tmp_path_factory, llama_tool, demo_model):
    """A re-quantized candidate of the demo model and llama-perplexity's KL run of it against the base.

    Flash attention off: llama-cpp-python's default, so its logits are the tools' logits.
    """
    base = demo_model
    quantize, perplexity = llama_tool("llama-quantize"), llama_tool("llama-perplexity")
    d = tmp_path_factory.mktemp(f"kld-{request.param}")
    cand = d / f"cand-{request.param}.gguf"
    _run([quantize, "--allow-requantize", base, cand, request.param, 2])
    text_file = d / "text.txt"
    text_file.write_text(_corpus())
    common = ["-f", text_file, "-c", N_CTX, "-b", N_CTX, "--chunks", N_CHUNKS, "-t", 2, "-fa", "off"]
    _run([perplexity, "-m", base, "--kl-divergence-base", d / "base.kld", *common])
    printout = _run([perplexity, "-m", cand, "--kl-divergence-base", d / "base.kld", "--kl-divergence", *common])
    return dict(qtype=request.param, base=base, cand=cand, text_file=text_file, dir=d, common=common,
                theirs=llamacpp.parse_kl_printout(printout))


def _side_by_side(title: str, ours: dict, theirs: dict) -> str:
    rows = "\n".join(f"{k:>13}: ours {ours[k]:11.6f}   llama-perplexity {theirs[k]:11.6f}" for k in KEYS)
    return f"\n{title}\n{rows}"


@pytest.mark.slow
def test_statistics_match_llama_perplexity_on_its_own_logprobs(kld_run, llama_tool):
    """Our statistics of llama-perplexity's own (uint16-stored) log-probs: checks the formulas alone."""
    cand_file = kld_run["dir"] / "cand.kld"
    _run([llama_tool("llama-perplexity"), "-m", kld_run["cand"], "--kl-divergence-base", cand_file, *kld_run["common"]])
    base, cand = llamacpp.read_kld_base(kld_run["dir"] / "base.kld"), llamacpp.read_kld_base(cand_file)
    np.testing.assert_array_equal(base.tokens, cand.tokens)
    acc, n_floored = kl.KLAccumulator(), 0
    for c in range(base.n_chunk):
        lp, tgt = base.logprobs(c), kl.scored_targets(base.tokens)[c]
        rows, lp_tgt = np.arange(len(tgt)), lp[np.arange(len(tgt)), tgt]
        lp[lp <= -16] = -np.inf  # llama.cpp leaves base probabilities <= e^-16 out of the KL sum...
        lp[rows, tgt] = lp_tgt  # ...but not out of the next token's NLL
        lq = cand.logprobs(c)
        floor = (cand.rows[c, :, :4].copy().view(np.float32))[:, 1:2]  # the candidate's 16-nat floor
        n_floored += int(np.isinf(lq[rows, tgt]).sum())
        lq = np.where(np.isinf(lq), floor, lq)  # below it: unknown, the floor is the nearest value
        acc.update(lp, lq, tgt, logprobs=True)  # as stored, not renormalised
    ours, theirs = acc.result().to_dict(), kld_run["theirs"]
    print(_side_by_side(f"{kld_run['qtype']} vs Q4_1 base, {acc.count} tokens, llama-perplexity's log-probs",
                        ours, theirs))
    print(f"next tokens below the candidate's stored 16-nat floor: {n_floored}")
    # Differences: the candidate's uint16 rounding (<= 1.2e-4 nat per log-prob) and printed digits;
    # and where the candidate's log-prob is below its stored 16-nat floor, the floor stands in for it.
    # A token's KLD moves by both: up to 4.1e-4 nat measured on the demo's Q4_K_M (its p95 0.143921
    # here vs 0.144058 from llama-cpp-python's float logits of the same candidate, which equals
    # llama-perplexity's printout). A percentile moves by at most the largest per-token move, so they
    # get 5e-4 nat; a wrong percentile rule (nearest rank, no interpolation) misses by the neighbours'
    # gap, 1.3e-3 at that p95.
    for k in KEYS:
        if n_floored and k in ("ppl_q", "ppl_ratio", "ln_ppl_ratio"):
            assert ours[k] < theirs[k], k  # a floored NLL(Q) can only be underestimated here
            continue
        tol = 5e-4 if k in ("kld_median", "kld_p90", "kld_p95", "kld_p99") else 2e-5
        assert ours[k] == pytest.approx(theirs[k], rel=5e-4, abs=tol + (2 / acc.count if k == "same_top_p" else 0)), k


def _llama_logits(llama_cpp, model: Path, chunks: np.ndarray) -> list[np.ndarray]:
    """llama.cpp's logits at the scored positions of each chunk (fresh KV cache per chunk)."""
    llm = llama_cpp.Llama(model_path=str(model), logits_all=True, n_ctx=N_CTX, n_batch=N_CTX,
                          n_threads=2, flash_attn=False, verbose=False)
    out = []
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk.tolist())
        out.append(np.array(llm.scores[:N_CTX][kl.scored_positions(N_CTX)], dtype=np.float32))
    del llm
    return out


@pytest.mark.slow
def test_agrees_with_llama_perplexity(kld_run):
    """Our statistics of llama-cpp-python's logits for the same chunks vs llama-perplexity's printout."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    # tokenize exactly as llama-perplexity (-f drops one trailing newline; add_special=true)
    text = kld_run["text_file"].read_text()
    text = text[:-1] if text.endswith("\n") else text
    vocab = llama_cpp.Llama(model_path=str(kld_run["base"]), vocab_only=True, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model))
    tokens = vocab.tokenize(text.encode(), add_bos=True, special=False)
    chunks = kl.perplexity_chunks(tokens, N_CTX, vocab.token_bos() if add_bos else None, N_CHUNKS)
    # the base file stores the tokens llama-perplexity evaluated (position 0 before the BOS swap)
    stored = llamacpp.read_kld_base(kld_run["dir"] / "base.kld").tokens
    np.testing.assert_array_equal(chunks[:, 1:], stored[:, 1:])

    ref_logits = _llama_logits(llama_cpp, kld_run["base"], chunks)
    cand_logits = _llama_logits(llama_cpp, kld_run["cand"], chunks)
    acc = kl.KLAccumulator()
    for r, c, t in zip(ref_logits, cand_logits, kl.scored_targets(chunks)):
        acc.update(r, c, t)
    assert acc.count == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    ours, theirs = acc.result().to_dict(), kld_run["theirs"]
    print(_side_by_side(f"{kld_run['qtype']} vs Q4_1 base, {acc.count} tokens, llama-cpp-python logits",
                        ours, theirs))
    for k in KEYS:
        assert ours[k] == pytest.approx(theirs[k], rel=0.02), k
