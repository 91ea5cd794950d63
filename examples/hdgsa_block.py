"""A reference Hybrid DeltaNet + Gated Sparse Attention block with mHC residual streams.

A readable example to copy, not a package: every op comes from the public API of the hdgsa
packages (through the ``hdgsa_kernels`` meta-package), with ``backend="auto"``, so the same
code runs the Triton kernels on a GPU and the PyTorch implementations on a CPU.

One block, on ``n`` residual streams ``x`` ``[B, T, n, C]`` (manifold-constrained
hyper-connections, mHC)::

    layer_in = sum_i pre[i] * x[:, :, i]                       pre = sigmoid(.)          [n]
    h        = RMSNorm(layer_in)
    o_delta  = gated delta rule branch(h)                      (linear attention)
    o_gsa    = gated sparse attention branch(h)                (indexer top-k + sparse attention)
    x_new    = P @ x + post_delta (x) o_delta + post_gsa (x) o_gsa
               P = sinkhorn_knopp(res_logits)                  doubly stochastic [n, n]

``pre``, ``post`` and ``res_logits`` are computed per token from the normalized streams, as in
mHC; Sinkhorn-Knopp makes the stream mixing doubly stochastic, so the residual streams neither
blow up nor vanish with depth.

The GSA branch selects keys with the gated lightning indexer (``indexer_topk``, one selection
shared by all attention heads), attends over them (``sparse_attention``), and trains the indexer
through ``indexer_scores_at``: a KL loss between the attention's distribution over the selected
keys (averaged over heads, no gradient) and the softmax of the indexer's scores at those keys.
That loss is returned next to the block's output; the model adds it to the language-model loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hdgsa_kernels import (
    RMSNorm,
    gated_delta_rule,
    indexer_scores_at,
    indexer_topk,
    sinkhorn_knopp,
    sparse_attention,
)

__all__ = ["BlockConfig", "HDGSABlock", "HDGSAModel"]


@dataclass(frozen=True)
class BlockConfig:
    dim: int = 64  # C, the width of one residual stream
    streams: int = 4  # n, mHC's residual streams
    attn_heads: int = 4  # GSA query heads
    kv_heads: int = 2  # GSA key/value heads (GQA)
    head_dim: int = 16
    index_heads: int = 2  # indexer heads (each votes with a sigmoid gate)
    index_dim: int = 16
    topk: int = 16  # keys each query attends to
    sink_size: int = 2  # leading keys always selected
    index_temperature: float = 0.05  # softmax temperature of the indexer scores in the KL loss
    delta_heads: int = 2
    delta_head_dim: int = 16
    sinkhorn_iters: int = 20
    backend: str = "auto"


class GatedDeltaBranch(nn.Module):
    """Linear attention with the gated delta rule: per-head state ``S`` ``[K, V]``, decayed by
    ``alpha`` and corrected toward ``v`` with step ``beta`` at each token."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.delta_heads * cfg.delta_head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * width, bias=False)
        self.gates = nn.Linear(cfg.dim, 2 * cfg.delta_heads)  # alpha and beta logits
        self.out = nn.Linear(width, cfg.dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = h.shape
        heads, dim = self.cfg.delta_heads, self.cfg.delta_head_dim
        q, k, v = self.qkv(h).view(batch, seq_len, 3, heads, dim).unbind(2)
        # Unit-norm keys keep the delta rule's update a projection (the usual Gated DeltaNet choice).
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        alpha, beta = torch.sigmoid(self.gates(h)).view(batch, seq_len, 2, heads).unbind(2)
        o = gated_delta_rule(q, k, v, alpha, beta, backend=self.cfg.backend)
        return self.out(o.reshape(batch, seq_len, heads * dim))


class GatedSparseAttentionBranch(nn.Module):
    """Attention over the top-k keys that the gated lightning indexer picks for each query."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.dim, cfg.attn_heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.attn_heads * cfg.head_dim, cfg.dim, bias=False)
        # The indexer: its own small queries (per head), one key per token, a gate per head.
        self.index_q = nn.Linear(cfg.dim, cfg.index_heads * cfg.index_dim, bias=False)
        self.index_k = nn.Linear(cfg.dim, cfg.index_dim, bias=False)
        self.index_w = nn.Linear(cfg.dim, cfg.index_heads, bias=False)
        self.index_bias = nn.Parameter(torch.zeros(cfg.index_heads))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        batch, seq_len, _ = h.shape
        q = self.q(h).view(batch, seq_len, cfg.attn_heads, cfg.head_dim)
        k, v = self.kv(h).view(batch, seq_len, 2, cfg.kv_heads, cfg.head_dim).unbind(2)
        iq = self.index_q(h).view(batch, seq_len, cfg.index_heads, cfg.index_dim)
        ik, iw = self.index_k(h), self.index_w(h)
        index_scale = cfg.index_dim**-0.5

        # Selection is not differentiable: the indexer learns through the KL loss below.
        indices, _ = indexer_topk(
            iq.detach(), ik.detach(), iw.detach(), self.index_bias.detach(), cfg.topk,
            scale=index_scale, causal=True, sink_size=cfg.sink_size, backend=cfg.backend,
        )  # fmt: skip
        out, lse = sparse_attention(q, k, v, indices, return_lse=True, backend=cfg.backend)
        index_loss = self._indexer_loss(q, k, lse, iq, ik, iw, indices, index_scale)
        return self.out(out.reshape(batch, seq_len, -1)), index_loss

    def _indexer_loss(self, q, k, lse, iq, ik, iw, indices, index_scale) -> torch.Tensor:
        """KL(attention over the selected keys || softmax of the indexer scores at them)."""
        cfg = self.cfg
        valid = indices >= 0  # [B, T, K]; -1 pads queries with fewer than topk visible keys
        with torch.no_grad():
            batch = torch.arange(q.shape[0], device=q.device)[:, None, None]
            keys = k[batch, indices.clamp(min=0).long()]  # [B, T, K, Hkv, D]
            keys = keys.repeat_interleave(cfg.attn_heads // cfg.kv_heads, dim=3)
            logits = torch.einsum("bthd,btkhd->bthk", q.float(), keys.float()) * cfg.head_dim**-0.5
            # The attention's own probabilities: exp(logit - lse), lse from sparse_attention.
            probs = torch.exp(logits - lse.transpose(1, 2).unsqueeze(-1)) * valid[:, :, None]
            target = probs.mean(dim=2)  # [B, T, K], averaged over heads
        scores = indexer_scores_at(
            iq, ik, iw, self.index_bias, indices, scale=index_scale, backend=cfg.backend
        )
        log_q = torch.log_softmax(scores / cfg.index_temperature, dim=-1)  # -inf at invalid slots
        kl = torch.xlogy(target, target) - torch.where(valid, target * log_q, 0.0)
        return kl.sum(-1).mean()


class HDGSABlock(nn.Module):
    """One hybrid block on ``n`` mHC residual streams: ``[B, T, n, C] -> ([B, T, n, C], loss)``."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.streams
        self.mix_norm = RMSNorm(n * cfg.dim)
        # Per token: pre (n), post for each branch (2n), the residual mixing logits (n * n).
        self.mix = nn.Linear(n * cfg.dim, 3 * n + n * n)
        nn.init.zeros_(self.mix.weight)  # start as identity-like mixing, equal stream weights
        self.norm = RMSNorm(cfg.dim)
        self.delta = GatedDeltaBranch(cfg)
        self.gsa = GatedSparseAttentionBranch(cfg)

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, n = self.cfg, self.cfg.streams
        batch, seq_len = streams.shape[:2]
        mix = self.mix(self.mix_norm(streams.reshape(batch, seq_len, n * cfg.dim)))
        pre, post_delta, post_gsa, res_logits = mix.split([n, n, n, n * n], dim=-1)
        pre = torch.sigmoid(pre)
        post_delta, post_gsa = 2 * torch.sigmoid(post_delta), 2 * torch.sigmoid(post_gsa)
        # Doubly stochastic stream mixing, one 4x4 matrix per token (mHC's n = 4).
        eye = torch.eye(n, device=streams.device, dtype=res_logits.dtype)
        mixing = sinkhorn_knopp(
            res_logits.view(batch, seq_len, n, n) + 4.0 * eye, num_iters=cfg.sinkhorn_iters,
            backend=cfg.backend,
        )  # fmt: skip

        h = self.norm(torch.einsum("btn,btnc->btc", pre, streams))
        o_delta = self.delta(h)
        o_gsa, index_loss = self.gsa(h)
        mixed = torch.einsum("btij,btjc->btic", mixing, streams)
        out = mixed + post_delta[..., None] * o_delta[:, :, None] + post_gsa[..., None] * o_gsa[:, :, None]
        return out, index_loss


class HDGSAModel(nn.Module):
    """A small language model: embedding -> ``n`` copies -> blocks -> stream mean -> head."""

    def __init__(self, cfg: BlockConfig, vocab_size: int, num_layers: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(HDGSABlock(cfg) for _ in range(num_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, index_loss_weight: float = 0.1) -> torch.Tensor:
        """Next-token cross-entropy of ``tokens`` ``[B, T]`` plus the weighted indexer losses."""
        x = self.embed(tokens[:, :-1])
        streams = x[:, :, None].expand(-1, -1, self.cfg.streams, -1)
        index_loss = x.new_zeros(())
        for block in self.blocks:
            streams, block_index_loss = block(streams)
            index_loss = index_loss + block_index_loss
        logits = self.head(self.norm(streams.mean(dim=2)))
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        return lm_loss + index_loss_weight * index_loss
