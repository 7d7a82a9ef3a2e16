"""Point-wise feed-forward sublayer of SASRec: Dropout(W2 · Dropout(ReLU(W1 x))), inner width = model width."""

from torch import Tensor, nn

from seqrec.nn.dropout import Dropout


class PointwiseFFN(nn.Module):
    """Two position-wise linear maps (the papers' kernel-size-1 Conv1d) with ReLU and two dropouts."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout), nn.Linear(dim, dim), Dropout(dropout)
        )

    def forward(self, x: Tensor, ctx=None) -> Tensor:
        return self.net(x)
