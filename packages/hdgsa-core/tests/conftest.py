from hdgsa_core.testing import poison_empty  # noqa: F401  (autouse: torch.empty outputs start as NaN)
