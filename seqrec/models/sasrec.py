"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018, arXiv 1808.09781).

Deviations from SASRec.pytorch, on purpose: padded keys are masked (the port lets queries attend to the left
padding), the input may be trimmed to the batch's longest sequence (positions stay right-aligned, so outputs
are identical), and the residual connection is a pluggable factory (plain or mHC).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqrec.models.head import ItemHead
from seqrec.nn.attention import AttentionContext, CausalSelfAttention, causal_padding_mask
from seqrec.nn.ffn import FFNS, Dropout, make_ffn
from seqrec.nn.residual import LN_EPS, Plain
from seqrec.utils.rules import POSITIVE, interval, one_of


class Block(nn.Module):
    """One Transformer block: an attention sublayer and an FFN sublayer, each behind a residual connection."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, residual, dim: int, norm_first: bool):
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.attn_connection = residual.connection(dim, norm_first)
        self.ffn_connection = residual.connection(dim, norm_first)

    def forward(self, state: Tensor, ctx: AttentionContext) -> Tensor:
        state = self.attn_connection(state, lambda u: self.attn(u, ctx))
        return self.ffn_connection(state, self.ffn, keep=ctx.valid)  # padding rows leave every block as zeros


class SASRec(nn.Module):
    """Causal Transformer over item ids; `head` scores items (by default: dot product with the input embedding).

    Args:
        num_items: number of items I (ids 1..I; 0 is padding). Filled in at runtime from the data.
        maxlen: window length L; inputs are left-padded with 0 and may be shorter (trimmed batches).
        hidden_units: hidden size D; must be divisible by num_heads.
        num_blocks: number of Transformer blocks.
        num_heads: attention heads.
        dropout_rate: dropout on embeddings, attention weights and inside the FFN.
        norm_first: Pre-LN (x + F(LN(x))) if True, Post-LN (LN(x + F(x)), SASRec.pytorch's default) if False.
        residual: residual factory (seqrec.nn.residual.Plain, Gated or MHC); plain when None.
        ffn: the feed-forward sublayer, "relu" (SASRec's) or "swiglu" (seqrec.nn.ffn).
        ffn_multiplier: the FFN's inner width in units of hidden_units (SASRec: 1; LLaMA, LiGR: 4).
        sparse_embedding: the item table's gradient is a sparse tensor of the rows a batch touches (its input
            items, targets and negatives) instead of a dense (I+1, D) one; for `optimizer=lazy_adam`, which then
            updates those rows only (seqrec/train/lazy_adam.py). Losses that score every item refuse it.
    """

    RULES = {
        "maxlen": POSITIVE,
        "hidden_units": POSITIVE,  # and divisible by num_heads (seqrec/utils/config.py, a rule across two keys)
        "num_blocks": POSITIVE,
        "num_heads": POSITIVE,
        "dropout_rate": interval(0, 1, "[)"),
        "ffn": one_of(*FFNS),
        "ffn_multiplier": POSITIVE,
    }

    def __init__(
        self,
        *,
        num_items: int,
        maxlen: int = 200,
        hidden_units: int = 50,
        num_blocks: int = 2,
        num_heads: int = 2,
        dropout_rate: float = 0.2,
        norm_first: bool = False,
        residual=None,
        sparse_embedding: bool = False,
        ffn: str = "relu",
        ffn_multiplier: int = 1,
    ):
        super().__init__()
        self.num_items, self.maxlen, self.dim = num_items, maxlen, hidden_units
        self.num_heads, self.dropout_rate, self.norm_first = num_heads, dropout_rate, norm_first
        self.residual = residual if residual is not None else Plain()
        self.item_emb = nn.Embedding(num_items + 1, hidden_units, padding_idx=0, sparse=sparse_embedding)
        self.emb_dropout = Dropout(dropout_rate)
        self.add_input_embeddings()
        self.blocks = nn.ModuleList(
            Block(
                self.make_attention(),
                make_ffn(ffn, hidden_units, dropout_rate, ffn_multiplier),
                self.residual,
                hidden_units,
                norm_first,
            )
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(hidden_units, eps=LN_EPS)
        self.head = self.make_head()  # last: a head's own parameters follow the others in checkpoints
        self.reset_parameters()

    # --- seams a time-aware subclass overrides -------------------------------------------------------
    def add_input_embeddings(self) -> None:
        """Learned absolute positions, row 0 = padding (docs/MODELS.md (Eq. 2), our choice of indexing)."""
        self.pos_emb = nn.Embedding(self.maxlen + 1, self.dim, padding_idx=0)

    def make_attention(self) -> nn.Module:
        return CausalSelfAttention(self.dim, self.num_heads, self.dropout_rate)

    def make_head(self) -> ItemHead:
        """Item scores from the input item embedding (tied, no bias), as in SASRec; it gathers rows as the table
        does (sparse gradients with `sparse_embedding`)."""
        return ItemHead(self.item_emb, tied=True)

    def embed(self, seq: Tensor, ctx: AttentionContext) -> Tensor:
        x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(ctx.extras["positions"])  # (B, L, D)
        return self.emb_dropout(x) * ctx.valid.unsqueeze(-1)

    def context(self, seq: Tensor, times: Tensor | None, time_scale: Tensor | None) -> AttentionContext:
        valid = seq != 0  # (B, L)
        L = seq.shape[1]
        if L > self.maxlen:
            raise ValueError(f"input length {L} exceeds model.maxlen={self.maxlen}")
        # right-aligned positions: the most recent item is always position maxlen, whatever the trimming
        positions = torch.arange(self.maxlen - L + 1, self.maxlen + 1, device=seq.device) * valid  # (B, L)
        return AttentionContext(valid=valid, attn_mask=causal_padding_mask(valid), extras={"positions": positions})

    def init_modules(self) -> list[nn.Module]:
        """Modules whose >=2-D weights get Xavier-normal init (the residual factory initialises its own)."""
        return [self.item_emb, self.pos_emb] + [m for b in self.blocks for m in (b.attn, b.ffn)]

    # --- the model ---------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        for module in self.init_modules():
            for p in module.parameters():
                if p.dim() >= 2:
                    nn.init.xavier_normal_(p)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def forward(self, seq: Tensor, times: Tensor | None = None, time_scale: Tensor | None = None) -> Tensor:
        """Hidden states for every position.

        Args:
            seq: (B, L) int64 item ids, left-padded with 0.
            times: (B, L) int64 timestamps (time-aware models only; ignored here).
            time_scale: (B,) int64 per-user time scale (time-aware models only).
        Returns:
            (B, L, D) final-normalised hidden states; row t predicts the item after seq[:, t].
        """
        ctx = self.context(seq, times, time_scale)
        state = self.residual.expand(self.embed(seq, ctx))  # (B, L, D) or (B, L, S, D) for mHC
        for block in self.blocks:
            state = block(state, ctx)
        return self.final_norm(self.residual.reduce(state))

    def diagnostics(self) -> dict[str, float]:
        """The residual's health numbers from the latest forward pass (mHC: H_res row/column sums, gains, gates);
        logged with each validation. Empty for the plain residual."""
        read = getattr(self.residual, "diagnostics", None)
        return read(self) if read is not None else {}
