"""Training side of mtp-selfdistill: turn a causal LM into a multi-token predictor by online self-distillation."""
