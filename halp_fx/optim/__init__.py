"""torchhalp-compatible optimizers (see issue 3)."""
