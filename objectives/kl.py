"""KL divergence between a reference and a candidate model: the statistics of ``llama-perplexity --kl-divergence``.

One implementation, used by the search, the benchmarks and the tests. It mirrors
``kl_divergence()`` in llama.cpp's ``tools/perplexity/perplexity.cpp``:

* the text is tokenized once (BOS first when the vocab adds one) and cut into ``n_ctx`` chunks; when
  the vocab adds BOS, the first token of every chunk is replaced by BOS (:func:`perplexity_chunks`);
* only the second half of each chunk is scored: the logits at positions ``n_ctx/2 .. n_ctx-2``
  predicting tokens ``n_ctx/2+1 .. n_ctx-1`` (:func:`scored_positions`), ``n_ctx - 1 - n_ctx/2`` per chunk;
* per token: KL(base || Q) over the vocabulary, NLL of the next token under both, Δp = p_Q(next) -
  p_base(next), and whether both argmaxes agree ("Same top p");
* at the end: PPL(Q), PPL(base), their correlation, ln(PPL(Q)/PPL(base)), PPL ratio and difference,
  mean KLD ± its standard error, KLD/Δp percentiles (linear interpolation), RMS Δp, Same top p.

Differences from llama.cpp, on purpose: everything is float64 and exact, where llama.cpp stores the
base log-probs as uint16 over a 16-nat range and leaves base probabilities below e^-16 out. Fed
llama-cpp-python's logits for the same chunks, the mean KLD differs from llama-perplexity's by ~0.2%
(SmolLM2-135M, Q2_K and Q4_K_M vs Q4_1); fed llama-perplexity's own stored log-probs, by ~5e-5
(tests/objectives/test_kl.py).

Fractions are fractions here (``same_top_p = 0.93``), where llama.cpp prints percent;
the benchmarks' parser of that printout (outside the product, in bench/llamacpp.py) converts it to
the same keys and units.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

# Quantiles reported, (key suffix, fraction) from the top, as llama-perplexity prints them.
KLD_QUANTILES = (("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90),
                 ("p10", 0.10), ("p5", 0.05), ("p1", 0.01), ("p0_1", 0.001))
DP_QUANTILES = (("p99_9", 0.999), ("p99", 0.99), ("p95", 0.95), ("p90", 0.90), ("p75", 0.75),
                ("p25", 0.25), ("p10", 0.10), ("p5", 0.05), ("p1", 0.01), ("p0_1", 0.001))


# ------------------------------------------------------------------------------------ chunking


def perplexity_chunks(tokens: Sequence[int] | np.ndarray, n_ctx: int, bos_token: int | None,
                      n_chunks: int | None = None) -> np.ndarray:
    """The ``(n_chunk, n_ctx)`` int32 token windows llama-perplexity evaluates.

    ``tokens`` is the whole text tokenized with BOS when the vocab adds one (``common_tokenize(...,
    add_special=true)``); ``bos_token`` is the BOS id when the vocab adds BOS, else None. The first
    token of each chunk is replaced by BOS (the scored targets are never position 0).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    n_max = len(tokens) // n_ctx
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"need at least {2 * n_ctx} tokens for n_ctx={n_ctx}, got {len(tokens)}")
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    chunks = tokens[: n * n_ctx].reshape(n, n_ctx).copy()
    if bos_token is not None:
        chunks[:, 0] = bos_token
    return chunks


def scored_positions(n_ctx: int) -> slice:
    """Positions whose logits are scored in a chunk: ``n_ctx//2 .. n_ctx-2`` (targets are the next tokens)."""
    return slice(n_ctx // 2, n_ctx - 1)


def scored_targets(chunks: np.ndarray) -> np.ndarray:
    """``(n_chunk, n_scored)`` next tokens for :func:`scored_positions`, from the original chunks."""
    n_ctx = chunks.shape[1]
    return chunks[:, n_ctx // 2 + 1:]


# ------------------------------------------------------------------------------ reference forms


class TopKRef(NamedTuple):
    """A reference distribution cut to its k most likely tokens (what an evaluation cache stores).

    ``indices`` (N, k) in decreasing order of probability, ``logprobs`` (N, k) the *full* reference's
    log-softmax at those indices, ``target_logprob`` (N,) its log-prob of the next token.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    target_logprob: torch.Tensor


def _t(x: Array, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x)  # torch wants writeable memory
        t = torch.from_numpy(x)
    else:
        t = x
    return t.to(device) if device is not None else t


def top_k_ref(ref_logits: Array, next_tokens: Array, k: int) -> TopKRef:
    """Reduce reference logits ``(N, V)`` to a :class:`TopKRef` of its k most likely tokens."""
    logits = _t(ref_logits)
    logp = torch.log_softmax(logits.double(), dim=-1)
    vals, idx = torch.topk(logp, k=min(k, logp.shape[-1]), dim=-1, sorted=True)
    tgt = _t(next_tokens, logp.device).long()
    return TopKRef(idx, vals, logp.gather(-1, tgt[:, None])[:, 0])


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, stable at both ends (Mächler 2012)."""
    a = a.clamp(max=0.0)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _kl_sum(ref_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """(N,) sum_v p (log p - log q) over the given entries, with 0 log 0 = 0."""
    p = ref_logp.exp()
    terms = torch.where(p > 0, p * (ref_logp - cand_logp), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(-1)


def _kl_full(ref_logp: torch.Tensor, cand_logp: torch.Tensor) -> torch.Tensor:
    """(N,) KL over the whole vocabulary."""
    return _kl_sum(ref_logp, cand_logp).clamp(min=0.0)  # KL >= 0; only rounding goes below


def _kl_topk(ref: TopKRef, cand_logp: torch.Tensor) -> torch.Tensor:
    """(N,) KL of the coarsened distributions {top-k tokens, everything else} (a lower bound of the full KL)."""
    idx = ref.indices.long()
    lp = ref.logprobs.to(cand_logp.dtype)
    lq = cand_logp.gather(-1, idx)
    head = _kl_sum(lp, lq)  # may be negative on its own
    if idx.shape[-1] >= cand_logp.shape[-1]:  # nothing left over (any "rest" mass is rounding)
        return head.clamp(min=0.0)
    lp_rest = _log1mexp(torch.logsumexp(lp, -1))
    lq_rest = torch.logsumexp(cand_logp.scatter(-1, idx, -math.inf), -1)  # exact, not 1 - sum
    p_rest = lp_rest.exp()
    tail = torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))
    return (head + tail).clamp(min=0.0)


# -------------------------------------------------------------------------------- statistics


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and llama.cpp's standard error of the mean (0 for 10 values or fewer)."""
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    m = float(x.mean())
    var = float(np.mean((x - m) ** 2))
    return m, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _cov_of_means(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean()))) / (n - 1)


@dataclass(frozen=True)
class KLStats:
    """What ``llama-perplexity --kl-divergence`` reports, as fractions (not percent). Keys of
    :meth:`to_dict` equal those of the benchmarks' parser of that printout (bench/llamacpp.py)."""

    n_tokens: int
    ppl_q: float
    ppl_q_err: float
    ppl_base: float
    ppl_base_err: float
    cor_ln_ppl: float  # Pearson correlation of per-token NLL(Q) and NLL(base)
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    kld_mean: float
    kld_mean_err: float
    kld_max: float
    kld_median: float
    kld_min: float
    kld_quantiles: dict[str, float]  # "p99" -> 99th percentile, ...
    dp_mean: float  # Δp = p_Q(next token) - p_base(next token)
    dp_mean_err: float
    dp_max: float
    dp_median: float
    dp_min: float
    dp_quantiles: dict[str, float]
    dp_rms: float
    dp_rms_err: float
    same_top_p: float  # fraction of tokens where both argmaxes agree
    same_top_p_err: float

    def to_dict(self) -> dict[str, float]:
        """Flat JSON-ready dict (quantiles as ``kld_p99``, ``dp_p5``, ...)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("kld_quantiles", "dp_quantiles")}
        d.update({f"kld_{k}": v for k, v in self.kld_quantiles.items()})
        d.update({f"dp_{k}": v for k, v in self.dp_quantiles.items()})
        return {k: (int(v) if k == "n_tokens" else float(v)) for k, v in d.items()}

    def table(self) -> str:
        """Plain text in llama-perplexity's layout (percent where it prints percent)."""
        d, q, dq = self.to_dict(), self.kld_quantiles, self.dp_quantiles
        lines = [
            f"====== Perplexity statistics ({self.n_tokens} tokens) ======",
            f"Mean PPL(Q)                   : {d['ppl_q']:10.6f} ± {d['ppl_q_err']:10.6f}",
            f"Mean PPL(base)                : {d['ppl_base']:10.6f} ± {d['ppl_base_err']:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * d['cor_ln_ppl']:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {d['ln_ppl_ratio']:10.6f} ± {d['ln_ppl_ratio_err']:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {d['ppl_ratio']:10.6f} ± {d['ppl_ratio_err']:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {d['ppl_diff']:10.6f} ± {d['ppl_diff_err']:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.kld_mean:10.6f} ± {self.kld_mean_err:10.6f}",
            f"Maximum KLD: {self.kld_max:10.6f}",
            *[f"{_pct(f):>4}%   KLD: {q[k]:10.6f}" for k, f in KLD_QUANTILES[:4]],
            f"Median  KLD: {self.kld_median:10.6f}",
            *[f"{_pct(f):>4}%   KLD: {q[k]:10.6f}" for k, f in KLD_QUANTILES[4:]],
            f"Minimum KLD: {self.kld_min:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * self.dp_mean:6.3f} ± {100 * self.dp_mean_err:5.3f} %",
            f"Maximum Δp: {100 * self.dp_max:6.3f}%",
            *[f"{_pct(f):>4}%   Δp: {100 * dq[k]:6.3f}%" for k, f in DP_QUANTILES[:5]],
            f"Median  Δp: {100 * self.dp_median:6.3f}%",
            *[f"{_pct(f):>4}%   Δp: {100 * dq[k]:6.3f}%" for k, f in DP_QUANTILES[5:]],
            f"Minimum Δp: {100 * self.dp_min:6.3f}%",
            f"RMS Δp    : {100 * self.dp_rms:6.3f} ± {100 * self.dp_rms_err:5.3f} %",
            f"Same top p: {100 * self.same_top_p:6.3f} ± {100 * self.same_top_p_err:5.3f} %",
        ]
        return "\n".join(lines)


def _pct(f: float) -> str:
    return f"{100 * f:.1f}"


@dataclass
class KLAccumulator:
    """Streaming per-token KL statistics; feed batches with :meth:`update`, read :meth:`result`.

    Per-token values are kept (5 float64 per token) so percentiles are exact and the variances
    two-pass. Inputs may be numpy arrays or torch tensors on any device; the math runs in float64 on
    the inputs' device, ``block_rows`` rows at a time to bound memory.
    """

    top_k: int | None = None  # score against the reference's top-k only (coarsened KL, see TopKRef)
    block_rows: int = 128  # rows per float64 block: 128 x 49152 vocab x 8 B = 50 MB per tensor
    _parts: list[np.ndarray] = field(default_factory=list, repr=False)  # (5, n) blocks

    @property
    def count(self) -> int:
        return sum(p.shape[1] for p in self._parts)

    def update(self, ref: Array | TopKRef, cand_logits: Array, next_tokens: Array, *,
               logprobs: bool = False) -> None:
        """Add ``N`` scored positions: reference logits ``(N, V)`` (or a :class:`TopKRef`), candidate
        logits ``(N, V)``, and the ``(N,)`` next tokens they predict. ``logprobs=True``: both are
        log-probabilities already and are used as they are (no log-softmax, so no renormalisation)."""
        cand = _t(cand_logits)
        tgt = _t(next_tokens, cand.device).long().reshape(-1)
        if cand.ndim != 2 or cand.shape[0] != tgt.shape[0]:
            raise ValueError(f"cand_logits must be (N, V) with N = len(next_tokens); got {tuple(cand.shape)}")
        ref = TopKRef(*(_t(x, cand.device) for x in ref)) if isinstance(ref, TopKRef) else _t(ref, cand.device)
        for i in range(0, cand.shape[0], self.block_rows):
            sl = slice(i, i + self.block_rows)
            r = TopKRef(*(x[sl] for x in ref)) if isinstance(ref, TopKRef) else ref[sl]
            self._parts.append(self._block(r, cand[sl], tgt[sl], logprobs))

    def _block(self, ref: torch.Tensor | TopKRef, cand: torch.Tensor, tgt: torch.Tensor,
               logprobs: bool) -> np.ndarray:
        cand_logp = cand.double() if logprobs else torch.log_softmax(cand.double(), dim=-1)  # (n, V)
        if not isinstance(ref, TopKRef):
            if ref.shape != cand.shape:
                raise ValueError(f"ref {tuple(ref.shape)} and cand {tuple(cand.shape)} logits differ in shape")
            if self.top_k is not None:
                ref = top_k_ref(ref, tgt, self.top_k)
        if isinstance(ref, TopKRef):
            kld = _kl_topk(ref, cand_logp)
            nll_base = -ref.target_logprob.double()
            ref_top = ref.indices[:, 0].long()
        else:
            ref_logp = ref.double() if logprobs else torch.log_softmax(ref.double(), dim=-1)
            kld = _kl_full(ref_logp, cand_logp)
            nll_base = -ref_logp.gather(-1, tgt[:, None])[:, 0]
            ref_top = ref.argmax(-1)
        nll_q = -cand_logp.gather(-1, tgt[:, None])[:, 0]
        same = (cand.argmax(-1) == ref_top).double()
        dp = torch.exp(-nll_q) - torch.exp(-nll_base)
        return torch.stack([kld, nll_q, nll_base, dp, same]).cpu().numpy()

    def merge(self, other: KLAccumulator) -> None:
        """Add another accumulator's tokens (e.g. from another worker)."""
        self._parts.extend(other._parts)

    def values(self) -> dict[str, np.ndarray]:
        """Per-token ``kld``, ``nll_q``, ``nll_base``, ``dp``, ``same_top`` (float64 arrays)."""
        a = np.concatenate(self._parts, axis=1) if self._parts else np.zeros((5, 0))
        return dict(zip(("kld", "nll_q", "nll_base", "dp", "same_top"), a))

    def result(self) -> KLStats:
        """The statistics over every token seen so far."""
        v = self.values()
        n = v["kld"].size
        if n < 2:
            raise ValueError(f"need at least 2 scored tokens, have {n}")
        return _stats(v["kld"], v["nll_q"], v["nll_base"], v["dp"], v["same_top"])


def _stats(kld: np.ndarray, nll_q: np.ndarray, nll_b: np.ndarray, dp: np.ndarray, same: np.ndarray) -> KLStats:
    n = kld.size
    lq, lq_se = _mean_se(nll_q)
    lb, lb_se = _mean_se(nll_b)
    cov = _cov_of_means(nll_q, nll_b)
    ln_ratio, ln_ratio_se = lq - lb, math.sqrt(max(lq_se**2 + lb_se**2 - 2 * cov, 0.0))
    ppl_q, ppl_b = _exp(lq), _exp(lb)
    with np.errstate(over="ignore", invalid="ignore"):
        pq, pb = np.float64(ppl_q), np.float64(ppl_b)
        ppl_diff_var = float((pq * lq_se) ** 2 + (pb * lb_se) ** 2 - 2 * pq * pb * cov)
    kl_m, kl_se = _mean_se(kld)
    dp_m, dp_se = _mean_se(dp)
    mse, mse_se = _mean_se(dp**2)
    rms = math.sqrt(mse)
    same_p = float(same.mean())
    return KLStats(
        n_tokens=n, ppl_q=ppl_q, ppl_q_err=ppl_q * lq_se, ppl_base=ppl_b, ppl_base_err=ppl_b * lb_se,
        cor_ln_ppl=cov / (lq_se * lb_se) if lq_se > 0 and lb_se > 0 else float("nan"),
        ln_ppl_ratio=ln_ratio, ln_ppl_ratio_err=ln_ratio_se,
        ppl_ratio=_exp(ln_ratio), ppl_ratio_err=_exp(ln_ratio) * ln_ratio_se,
        ppl_diff=ppl_q - ppl_b, ppl_diff_err=math.sqrt(max(ppl_diff_var, 0.0)),
        kld_mean=kl_m, kld_mean_err=kl_se, kld_max=float(kld.max()), kld_median=float(np.median(kld)),
        kld_min=float(kld.min()), kld_quantiles=_quantiles(kld, KLD_QUANTILES),
        dp_mean=dp_m, dp_mean_err=dp_se, dp_max=float(dp.max()), dp_median=float(np.median(dp)),
        dp_min=float(dp.min()), dp_quantiles=_quantiles(dp, DP_QUANTILES),
        dp_rms=rms, dp_rms_err=0.5 / rms * mse_se if rms > 0 else 0.0,
        same_top_p=same_p, same_top_p_err=math.sqrt(same_p * (1 - same_p) / (n - 1)),
    )


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def _quantiles(x: np.ndarray, spec: tuple[tuple[str, float], ...]) -> dict[str, float]:
    # llama.cpp: linear interpolation at fraction*(n-1), i.e. numpy's default "linear" method
    qs = np.quantile(x, [f for _, f in spec])
    return {k: float(v) for (k, _), v in zip(spec, qs)}


def kl_stats(ref: Array | TopKRef, cand_logits: Array, next_tokens: Array, top_k: int | None = None) -> KLStats:
    """One-shot :class:`KLStats` of ``(N, V)`` logits (see :class:`KLAccumulator`)."""
    acc = KLAccumulator(top_k=top_k)
    acc.update(ref, cand_logits, next_tokens)
    return acc.result()


# ------------------------------------------------------------------------------ search objective


def mean_kl(ref_logprobs: torch.Tensor | TopKRef, cand_logits: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> float:
    """Mean over rows of KL(ref || softmax(cand_logits)) — the search's objective, on torch tensors.

    ``ref_logprobs`` is the cached reference log-softmax ``(N, V)`` (or a :class:`TopKRef`), on the
    candidate's device. Computes in ``dtype`` (float32 by default: fast, ~1e-6 absolute error) and
    averages in float64.
    """
    cand_logp = torch.log_softmax(cand_logits.to(dtype), dim=-1)
    if isinstance(ref_logprobs, TopKRef):
        kld = _kl_topk(TopKRef(*(x.to(cand_logp.device) for x in ref_logprobs)), cand_logp)
    else:
        kld = _kl_full(ref_logprobs.to(device=cand_logp.device, dtype=dtype), cand_logp)
    return float(kld.double().mean())


# ------------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class FlipStats:
    """Multiple-choice answers that change between reference and candidate."""

    n_questions: int
    n_flips: int
    flip_rate: float
    flip_rate_err: float  # binomial standard error
    ref_choice: np.ndarray  # (n_questions,) argmax per question
    cand_choice: np.ndarray
    acc_ref: float | None = None  # accuracies when labels are given
    acc_cand: float | None = None
    right_to_wrong: int | None = None
    wrong_to_right: int | None = None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["ref_choice"], d["cand_choice"] = self.ref_choice.tolist(), self.cand_choice.tolist()
        return d


def mc_flips(ref_choice_scores: Sequence[Sequence[float]], cand_choice_scores: Sequence[Sequence[float]],
             labels: Sequence[int] | None = None) -> FlipStats:
    """Flips between two models' multiple-choice answers.

    Each argument holds, per question, one score per choice (e.g. summed log-likelihood of the
    continuation; questions may have different numbers of choices). The answer is the argmax (first
    on ties, as llama-perplexity). With ``labels`` (index of the right choice) also accuracies and
    right->wrong / wrong->right counts.
    """
    if len(ref_choice_scores) != len(cand_choice_scores):
        raise ValueError("reference and candidate score different numbers of questions")
    ref_c, cand_c = [], []
    for q, (r, c) in enumerate(zip(ref_choice_scores, cand_choice_scores)):
        if len(r) != len(c) or len(r) == 0:
            raise ValueError(f"question {q}: {len(r)} reference vs {len(c)} candidate choices")
        ref_c.append(int(np.argmax(np.asarray(r, dtype=np.float64))))
        cand_c.append(int(np.argmax(np.asarray(c, dtype=np.float64))))
    ref_a, cand_a = np.array(ref_c, dtype=np.int64), np.array(cand_c, dtype=np.int64)
    n = len(ref_a)
    flips = int((ref_a != cand_a).sum())
    rate = flips / n if n else 0.0
    err = math.sqrt(rate * (1 - rate) / (n - 1)) if n > 1 else 0.0
    extra = {}
    if labels is not None:
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape != ref_a.shape:
            raise ValueError("labels must have one entry per question")
        rr, cr = ref_a == lab, cand_a == lab
        extra = dict(acc_ref=float(rr.mean()) if n else 0.0, acc_cand=float(cr.mean()) if n else 0.0,
                     right_to_wrong=int((rr & ~cr).sum()), wrong_to_right=int((~rr & cr).sum()))
    return FlipStats(n, flips, rate, err, ref_a, cand_a, **extra)
