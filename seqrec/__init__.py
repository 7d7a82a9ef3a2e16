"""seqrec: self-attentive sequential recommendation (SASRec, TiSASRec, mHC) on Hydra + PyTorch."""

__version__ = "0.1.0"
