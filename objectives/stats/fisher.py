"""Output sensitivities: the diagonal Fisher of the model's next-token distribution with respect to
every linear layer's outputs, the embedding outputs and the logits.

One backward pass, block by block (the inputs of every block are kept from the forward pass, each
block is re-run with autograd and back-propagated, then freed), with the labels *sampled* from the
model itself, so that ``E[g g]`` is the Fisher, not the empirical Fisher of the text. Only squared
gradients summed over tokens are kept: ``f_o = mean_n g_{n,o}^2``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from dynsearch.objectives.blocks import block, rms_norm
from dynsearch.objectives.stats.moe import fill_dead_experts


@dataclass
class Sensitivities:
    n_tokens: int
    fisher_out: dict[str, np.ndarray] = field(default_factory=dict)  # linear name -> (out,)
    fisher_embed: np.ndarray | None = None  # (d,) w.r.t. the token embeddings (block 0 input)
    token_counts: np.ndarray | None = None  # (vocab,) occurrences of each token


class _OutputGrads:
    """Capture object for the block functions: hooks every linear output's gradient."""

    def __init__(self, sums: dict[str, torch.Tensor]):
        self.sums = sums
        self.expert_sums: dict[str, torch.Tensor] = {}  # MoE stack -> (n_expert, out) sum of g^2
        self.expert_tokens: dict[str, torch.Tensor] = {}  # MoE stack -> (n_expert,) routed tokens

    def __call__(self, name: str, x: torch.Tensor) -> None:  # inputs are not needed here
        pass

    def on_output(self, name: str, y: torch.Tensor) -> None:
        if not y.requires_grad:
            return

        def hook(g: torch.Tensor, name=name):
            s = g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0)
            self.sums[name] = self.sums[name] + s if name in self.sums else s

        y.register_hook(hook)

    def on_expert_output(self, name: str, expert: int, n_expert: int, y: torch.Tensor) -> None:
        """Expert ``expert``'s outputs (its routed tokens, out) of the stack ``name``."""
        if not y.requires_grad:
            return
        if name not in self.expert_sums:
            self.expert_sums[name] = torch.zeros((n_expert, y.shape[-1]), dtype=torch.float64)
            self.expert_tokens[name] = torch.zeros(n_expert, dtype=torch.float64)
        self.expert_tokens[name][expert] += y.shape[0]

        def hook(g: torch.Tensor, name=name, expert=expert):
            self.expert_sums[name][expert] += g.detach().double().pow(2).sum(0).cpu()

        y.register_hook(hook)

    def expert_fisher(self) -> dict[str, np.ndarray]:
        """Per MoE stack, (n_expert, out) mean g^2 over each expert's own routed tokens; experts no
        token reached get the live experts' mean (:func:`~dynsearch.objectives.stats.moe.fill_dead_experts`)."""
        out = {}
        for name, s in self.expert_sums.items():
            c = self.expert_tokens[name]
            mean = (s / c.clamp_min(1.0)[:, None]).numpy()
            out[name] = fill_dead_experts(mean, c.numpy())
        return out


HEAD_CHUNK_BYTES = 32 << 20  # one float64 (tokens, n_vocab) array of the Fisher head, at most


class _Spill:
    """Tensors put by index into a temporary folder and taken back (each file deleted when
    taken): memory holds one at a time."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="dynsearch-fisher-")

    def _path(self, i: int) -> str:
        return os.path.join(self._dir.name, f"{i}.npy")

    def put(self, i: int, t: torch.Tensor) -> None:
        np.save(self._path(i), t.detach().cpu().numpy())

    def take(self, i: int, device: torch.device) -> torch.Tensor:
        path = self._path(i)
        out = torch.from_numpy(np.load(path, allow_pickle=False)).to(device)
        os.unlink(path)
        return out

    def close(self) -> None:
        self._dir.cleanup()


def _head_logits(forward, x_final: torch.Tensor, norm: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(rms_norm(x_final, norm, forward.cfg.rms_eps), w_out)
    cap = forward.cfg.final_logit_softcap
    return torch.tanh(logits / cap) * cap if cap > 0 else logits


@torch.enable_grad()  # autograd whatever the caller's grad mode
def fisher_pass(forward, tokens: np.ndarray, seed: int = 0) -> Sensitivities:
    """Sampled-label Fisher diagonals for every linear output of ``forward``'s model."""
    tokens = np.asarray(tokens)
    n_seq, T = tokens.shape
    n = n_seq * T
    bs = forward.batch_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}

    # forward, keeping each block's input (on disk: n_layer copies of the hidden states would
    # make memory grow with the depth of the model)
    inputs = _Spill()
    with torch.inference_mode():
        h = forward.embed(tokens)
    for il in range(forward.cfg.n_layer):
        inputs.put(il, h)
        forward.run_block(il, h)

    # the head: sample labels from the model's own distribution, back-propagate to h
    out_name = "output.weight" if forward._has_output else "token_embd.weight"
    norm, w_out = forward.weight("output_norm.weight"), forward.weight(out_name)  # loaded once
    grad = torch.zeros_like(h)
    logit_sq = None
    d = h.shape[-1]
    h_rows, g_rows = h.reshape(-1, d), grad.view(-1, d)
    step = max(1, HEAD_CHUNK_BYTES // (8 * forward.cfg.n_vocab))  # tokens per vocabulary-wide chunk
    for s in range(0, h_rows.shape[0], step):
        x = h_rows[s:s + step].detach().clone().requires_grad_(True)
        logits = _head_logits(forward, x, norm, w_out)
        p = torch.softmax(logits.detach().double(), dim=-1)
        labels = torch.multinomial(p.float().cpu(), 1, generator=gen).to(p.device)[:, 0]
        p[torch.arange(p.shape[0]), labels] -= 1.0  # d(-log p_label)/d logits
        sq = p.pow_(2).sum(0)
        logit_sq = sq if logit_sq is None else logit_sq + sq
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        loss.backward()
        g_rows[s:s + step] = x.grad
        del logits, p, loss, x
    sums[out_name] = logit_sq
    del norm, w_out

    # blocks in reverse: re-run each with autograd, back-propagate the incoming gradient
    hooks = _OutputGrads(sums)
    for il in range(forward.cfg.n_layer - 1, -1, -1):
        lw = forward.layer_weights(il)
        rope, mask = forward._rope(il, T), forward._mask(il, T)
        new_grad = torch.zeros_like(grad)
        h_in = inputs.take(il, h.device)
        for s in range(0, n_seq, bs):
            x = h_in[s:s + bs].detach().clone().requires_grad_(True)
            y = block(forward.spec, forward.cfg, lw, x, rope, mask, hooks)
            y.backward(grad[s:s + bs])
            new_grad[s:s + bs] = x.grad
        grad = new_grad
        del lw, h_in
    inputs.close()

    sens = Sensitivities(n_tokens=n)
    sens.fisher_out = {k: (v / n).cpu().numpy() for k, v in sums.items()}
    sens.fisher_out.update(hooks.expert_fisher())
    sens.fisher_embed = (grad.double().pow(2).reshape(-1, grad.shape[-1]).sum(0) / n).cpu().numpy()
    sens.token_counts = np.bincount(tokens.reshape(-1), minlength=forward.cfg.n_vocab).astype(np.float64)
    return sens
