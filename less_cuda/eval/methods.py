"""What `less-cuda eval` compares, by name. No torch here: the command line builds its choices from these."""

METHODS = ("full", "sparse", "baseline_plus", "less")
"""Perplexity: the full cache, the sparse policy alone, Baseline+ (the sparse policy given LESS's state bytes as
extra tokens) and LESS."""
FORMS = ("parallel", "streaming", "prefill")
"""How a perplexity is computed: `perplexity`'s module docstring."""
PASSKEY_METHODS = ("full", "sparse", "less")
"""Passkey: the model's own cache, the policy alone (`apply(..., lowrank=False)`), and LESS."""
