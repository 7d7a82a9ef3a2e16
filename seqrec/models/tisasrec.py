"""TiSASRec: time-interval-aware self-attention for sequential recommendation (Li, Wang & McAuley, WSDM 2020).

SASRec with the absolute position moved from the input into attention (P^K, P^V) and clipped relative time
intervals added to keys and values (E^K, E^V), all four tables shared by the blocks, as the authors' code does.
Deviations from TiSASRec.pytorch, on purpose: intervals are bucketed per batch from the raw timestamps tensor
(seqrec.models.time_intervals) rather than precomputed per user, the interval tables are sized k+1 (not I+1), the
attention never builds (B, L, L, D) tensors (seqrec.nn.time_attention), and dropout hits the interval tables, not
the gathered per-pair embeddings (docs/MODELS.md, section 3). Blocks, residual factory, losses and trainer are SASRec's.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from seqrec.errors import ConfigError
from seqrec.models.sasrec import SASRec
from seqrec.models.time_intervals import TIME_UNITS, interval_buckets
from seqrec.nn.attention import AttentionContext
from seqrec.nn.ffn import Dropout
from seqrec.nn.time_attention import TimeIntervalAttention, relation_index
from seqrec.utils.rules import POSITIVE, one_of


def check_time_available(has_time: bool, dataset_name: str) -> None:
    """Fail early, with the fix, when model=tisasrec meets a dataset without timestamps."""
    if not has_time:
        raise ConfigError(
            f"model=tisasrec needs timestamps, but dataset '{dataset_name}' has none: "
            "use model=sasrec or a dataset with a timestamp column"
        )


class TiSASRec(SASRec):
    """SASRec whose attention sees absolute positions and clipped time intervals in its keys and values.

    Args:
        time_unit: second | minute | hour | day | personal (the user's smallest non-zero training gap).
        time_span: clip k; intervals of k units or more share the last bucket (buckets 0..k).
        **sasrec_kwargs: SASRec's arguments (num_items, maxlen, hidden_units, num_blocks, num_heads,
            dropout_rate, norm_first, residual).
    """

    requires_time = True
    RULES = {**SASRec.RULES, "time_span": POSITIVE, "time_unit": one_of(*TIME_UNITS)}

    def __init__(self, *, time_unit: str = "hour", time_span: int = 100, **sasrec_kwargs):
        if time_unit not in TIME_UNITS:
            raise ConfigError(f"model.time_unit must be one of {', '.join(TIME_UNITS)}; got '{time_unit}'")
        if time_span < 1:
            raise ConfigError(f"model.time_span must be >= 1, got {time_span}")
        self.time_unit, self.time_span = time_unit, time_span
        super().__init__(**sasrec_kwargs)

    def add_input_embeddings(self) -> None:
        # positions enter attention only (no position is added to the input), like the authors' code
        self.pos_k = nn.Embedding(self.maxlen + 1, self.dim, padding_idx=0)
        self.pos_v = nn.Embedding(self.maxlen + 1, self.dim, padding_idx=0)
        self.time_k = nn.Embedding(self.time_span + 1, self.dim)  # bucket 0 is a real interval (equal times)
        self.time_v = nn.Embedding(self.time_span + 1, self.dim)
        self.table_dropout = Dropout(self.dropout_rate)

    def make_attention(self) -> nn.Module:
        return TimeIntervalAttention(self.dim, self.num_heads, self.dropout_rate)

    def embed(self, seq: Tensor, ctx: AttentionContext) -> Tensor:
        x = self.item_emb(seq) * math.sqrt(self.dim)  # (B, L, D)
        return self.emb_dropout(x) * ctx.valid.unsqueeze(-1)

    def context(self, seq: Tensor, times: Tensor | None, time_scale: Tensor | None) -> AttentionContext:
        if times is None:
            raise ConfigError(
                "model=tisasrec needs timestamps, but the batch has none: "
                "use model=sasrec or a dataset with a timestamp column"
            )
        ctx = super().context(seq, times, time_scale)
        positions = ctx.extras["positions"]  # (B, L) right-aligned, 0 at padding
        buckets = interval_buckets(times, ctx.valid, self.time_unit, self.time_span, time_scale)  # (B, L, L)
        drop = self.table_dropout
        ctx.extras.update(
            relation_index=relation_index(buckets, ctx.attn_mask, self.time_span),  # (B, L, L)
            pos_k=drop(self.pos_k(positions)),  # (B, L, D)
            pos_v=drop(self.pos_v(positions)),
            time_k=drop(self.time_k.weight),  # (k+1, D): one dropout mask per bucket, shared by all pairs
            time_v=drop(self.time_v.weight),
        )
        return ctx

    def init_modules(self) -> list[nn.Module]:
        tables = [self.item_emb, self.pos_k, self.pos_v, self.time_k, self.time_v]
        return tables + [m for b in self.blocks for m in (b.attn, b.ffn)]
