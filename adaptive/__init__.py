"""Inference side of mtp-selfdistill: KV-cache MTP decoding with static, confidence-adaptive and self-speculative spans."""
