"""Model code: the latent Qwen2.5-VL subclass, its gated attention, layout checks and losses."""
