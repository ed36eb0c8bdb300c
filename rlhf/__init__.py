"""rlhf: a staged RLHF / preference-optimization framework on the Hugging Face stack."""

__version__ = "0.1.0"
