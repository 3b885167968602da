"""Block-by-block forward pass over GGUF-named weights.

The hidden states of all calibration sequences stay resident, (n_seq, T, d) float32, while the
weights of one block at a time are loaded, used for every sequence, and freed, so a model larger
than RAM runs as long as one block and the hidden states fit. Logits come out per batch of
sequences and are never all held at once::

    fwd = BlockwiseForward(GGUFSource("model.gguf"))
    for start, logp in fwd.logits(tokens, log_probs=True):   # tokens: (n_seq, T) int
        ...                                                   # logp: (B, T, n_vocab)

``overrides`` maps tensor names to replacement float32 weights (a dequantized candidate), shaped
as ``source.shape(name)``; ``capture(name, x)`` sees the input of every linear weight.

Everything that enters the block math -- weights, token ids, hidden states a caller makes -- goes
to the run's device through :func:`to_device`, the one host -> device move of a pass.
"""

from __future__ import annotations

import logging
from typing import Iterator, Mapping

import numpy as np
import torch

from dynsearch import system
from dynsearch.errors import DynsearchError, ModelError
from dynsearch.objectives.blocks import Capture, LayerWeights, Rope, block, rms_norm
from dynsearch.objectives.io.architectures import architecture
from dynsearch.objectives.io.model import WeightSource

log = logging.getLogger(__name__)

Overrides = Mapping[str, "np.ndarray | torch.Tensor"]

HEAD_BYTES = 128 << 20  # float32 logits of one head batch, at most (but always one sequence)
HEAD_ROWS_BYTES = 8 << 20  # float32 logits of one chunk of :meth:`BlockwiseForward.head_rows`


def to_device(x: np.ndarray | torch.Tensor, device: torch.device | str,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (a numpy array or a tensor anywhere) as a tensor on ``device`` (``dtype`` if given)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=dtype)


def check_device(name: str) -> str:
    """``name`` (``--device``) if torch can run on it here; a DynsearchError naming the problem
    otherwise (an unknown device, CUDA absent, an index past the last GPU)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DynsearchError(f"--device {name!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DynsearchError(f"--device {name}: CUDA is not available here (torch "
                                 f"{torch.__version__}{'' if torch.version.cuda else ', a CPU build'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DynsearchError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                                 "CUDA device(s), numbered from 0")
    elif device.type not in ("cpu", "meta"):
        raise DynsearchError(f"--device {name}: dynsearch runs on cpu or cuda")
    return name


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously): before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockwiseForward:
    """Runs one model's forward pass block by block on ``device`` ("cpu", "cuda", ...)."""

    def __init__(self, source: WeightSource, device: str | torch.device = "cpu", batch_size: int = 4):
        self.source = source
        self.cfg = source.config
        self.spec = architecture(self.cfg.arch)
        self.device = torch.device(device)
        self.batch_size = batch_size  # sequences per block call: bounds activation memory
        self.head_bytes = HEAD_BYTES  # bounds the vocabulary-wide logits of one head batch
        names = source.names()
        self._block_names = [[n for n in names if n.startswith(f"blk.{il}.")] for il in range(self.cfg.n_layer)]
        self._has_output = "output.weight" in names
        self._rope_factors = (torch.from_numpy(source.load("rope_freqs.weight"))
                              if "rope_freqs.weight" in names else None)
        self._ropes: dict[tuple, Rope] = {}

    # -- weights -------------------------------------------------------------------------------

    def weight(self, name: str, overrides: Overrides | None = None) -> torch.Tensor:
        """One float32 tensor on the device: the override where given, else the model's."""
        if overrides is not None and name in overrides:
            w = torch.as_tensor(overrides[name], dtype=torch.float32)
            if tuple(w.shape) != self.source.shape(name):
                raise ModelError(f"override for {name!r} has shape {tuple(w.shape)}, "
                                 f"expected {self.source.shape(name)}")
        else:
            w = self.source.load(name)
        return to_device(w, self.device)

    def layer_weights(self, il: int, overrides: Overrides | None = None) -> LayerWeights:
        system.trim()  # between blocks: the last one's temporaries, beyond what the next reuses
        prefix = len(f"blk.{il}.")
        return LayerWeights(il, {n[prefix:]: self.weight(n, overrides) for n in self._block_names[il]})

    # -- stages --------------------------------------------------------------------------------

    def embed(self, tokens: np.ndarray | torch.Tensor, overrides: Overrides | None = None) -> torch.Tensor:
        """Token embeddings (n_seq, T, d) of tokens (n_seq, T)."""
        tok = to_device(tokens, self.device, torch.long)
        if tok.ndim != 2:
            raise ValueError(f"tokens must be (n_seq, seq_len), got shape {tuple(tok.shape)}")
        if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= self.cfg.n_vocab):
            raise ValueError(f"token ids must lie in [0, {self.cfg.n_vocab})")
        rows = getattr(self.source, "load_rows", None)
        if rows is not None and (overrides is None or "token_embd.weight" not in overrides):
            # only the rows of the tokens present: the vocabulary-wide table is never resident
            ids, inv = torch.unique(tok.cpu(), return_inverse=True)
            table = to_device(rows("token_embd.weight", ids.numpy()), self.device)
            h = torch.nn.functional.embedding(to_device(inv, self.device), table)
        else:
            h = torch.nn.functional.embedding(tok, self.weight("token_embd.weight", overrides))
        if self.spec.embed_scale:
            h *= float(np.sqrt(np.float32(self.cfg.n_embd)))
        return h

    def _rope(self, il: int, n_ctx: int) -> Rope:
        cfg = self.cfg
        base, scale = (cfg.rope_base_swa, cfg.rope_scale_swa) if cfg.is_swa(il) else (cfg.rope_base, cfg.rope_scale)
        key = (n_ctx, base, scale)
        if key not in self._ropes:
            self._ropes[key] = Rope.build(n_ctx, cfg.n_rot, base, scale, self._rope_factors,
                                          self.spec.rope_neox, self.device)
        return self._ropes[key]

    def _mask(self, il: int, n_ctx: int) -> torch.Tensor | None:
        """None (plain causal) unless layer il slides a window shorter than the sequence."""
        w = self.cfg.sliding_window
        if not self.cfg.is_swa(il) or n_ctx <= w:
            return None
        i = torch.arange(n_ctx, device=self.device)
        dist = i[:, None] - i[None, :]  # query position - key position
        if self.cfg.swa_chunked:  # llama_hparams::is_masked_swa (CHUNKED): same chunk of w tokens
            return (dist >= 0) & (i[:, None] // w == i[None, :] // w)
        return (dist >= 0) & (dist < w)  # llama_hparams::is_masked_swa (STANDARD)

    def run_block(self, il: int, hidden: torch.Tensor, overrides: Overrides | None = None,
                  capture: Capture | None = None) -> None:
        """Apply block il to hidden (n_seq, T, d) in place, batch_size sequences at a time."""
        lw = self.layer_weights(il, overrides)
        T = hidden.shape[1]
        rope, mask = self._rope(il, T), self._mask(il, T)
        with torch.inference_mode():
            for s in range(0, hidden.shape[0], self.batch_size):
                hidden[s:s + self.batch_size] = block(self.spec, self.cfg, lw, hidden[s:s + self.batch_size],
                                                      rope, mask, capture)
        del lw

    def head_batch(self, seq_len: int) -> int:
        """Sequences per head batch: as many as ``batch_size`` whose (B, T, n_vocab) float32 logits
        fit ``head_bytes``, at least one (a vocabulary-wide array per token is the largest
        activation of a forward pass: 4 x 512 tokens x 49,152 logits is 400 MB)."""
        per_seq = 4 * max(1, seq_len) * self.cfg.n_vocab
        return max(1, min(self.batch_size, self.head_bytes // per_seq))

    def head_weights(self, overrides: Overrides | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output norm, lm head) on the device; the head is the token embedding when tied."""
        return (self.weight("output_norm.weight", overrides),
                self.weight(self.head_name, overrides))

    @property
    def head_name(self) -> str:
        return "output.weight" if self._has_output else "token_embd.weight"  # tied embeddings

    def _head(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], log_probs: bool,
              capture: Capture | None = None) -> torch.Tensor:
        norm, w_out = weights
        cap = self.cfg.final_logit_softcap
        with torch.inference_mode():
            x = rms_norm(x, norm, self.cfg.rms_eps)
            if capture is not None:
                capture(self.head_name, x.reshape(-1, x.shape[-1]))
            logits = torch.nn.functional.linear(x, w_out)
            if cap > 0:
                logits = torch.tanh(logits / cap) * cap
            return torch.log_softmax(logits, dim=-1) if log_probs else logits

    def head(self, hidden: torch.Tensor, overrides: Overrides | None = None, capture: Capture | None = None,
             log_probs: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, logits (B, T, n_vocab)) per batch of sequences (:meth:`head_batch`): output
        norm, lm head, softcap."""
        weights = self.head_weights(overrides)
        hb = self.head_batch(hidden.shape[1])
        for s in range(0, hidden.shape[0], hb):
            # inference mode only around the computation, never across the yield: a suspended
            # generator holding it would leak it to the caller (and two interleaved ones, as
            # in KL evaluation, would restore each other's state: grad mode left off)
            yield s, self._head(hidden[s:s + hb], weights, log_probs, capture)

    def head_rows(self, rows: torch.Tensor, overrides: Overrides | None = None, log_probs: bool = False,
                  weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, logits (n, n_vocab)) per chunk of ``rows`` (N, d) -- residual-stream rows of any
        sequences -- whose float32 logits fit ``HEAD_ROWS_BYTES`` (so a vocabulary-wide array is
        never held for more than a few dozen tokens, however long the sequences). ``weights``:
        :meth:`head_weights`, loaded once by a caller that calls this more than once."""
        weights = weights if weights is not None else self.head_weights(overrides)
        step = self.head_rows_step()
        for s in range(0, rows.shape[0], step):
            yield s, self._head(rows[s:s + step], weights, log_probs)

    def head_rows_step(self) -> int:
        """Rows per chunk of :meth:`head_rows`."""
        return max(1, HEAD_ROWS_BYTES // (4 * self.cfg.n_vocab))

    def hidden_states(self, tokens: np.ndarray | torch.Tensor, overrides: Overrides | None = None,
                      capture: Capture | None = None) -> torch.Tensor:
        """The residual stream (n_seq, T, d) after the last block."""
        with torch.inference_mode():
            hidden = self.embed(tokens, overrides)
        for il in range(self.cfg.n_layer):
            self.run_block(il, hidden, overrides, capture)
            log.debug("block %d/%d done", il + 1, self.cfg.n_layer)
        return hidden

    def logits(self, tokens: np.ndarray | torch.Tensor, overrides: Overrides | None = None,
               capture: Capture | None = None, log_probs: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Run every block, then yield (start, logits or log-probs (B, T, n_vocab)) per batch."""
        hidden = self.hidden_states(tokens, overrides, capture)
        yield from self.head(hidden, overrides, capture, log_probs)
