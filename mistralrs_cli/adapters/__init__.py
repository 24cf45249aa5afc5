"""LoRA and X-LoRA adapters: their files, orderings, and the bank both executors apply."""
