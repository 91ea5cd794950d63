from hdgsa_core.testing import poison_empty, strict_launches  # noqa: F401  (autouse: NaN-filled torch.empty, strict kernel launches)
