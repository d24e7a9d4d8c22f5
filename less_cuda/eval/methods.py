"""What `less-cuda eval` compares, by name. No torch here: the command line builds its choices from these."""

METHODS = ("full", "sparse", "baseline_plus", "less")
"""Perplexity: the full cache, the sparse policy alone, Baseline+ (the sparse policy given LESS's state bytes as
extra tokens) and LESS."""
FORMS = ("parallel", "streaming", "prefill")
"""How a perplexity is computed: `perplexity`'s module docstring."""
PASSKEY_METHODS = ("full", "sparse", "less")
"""Passkey: the model's own cache, the policy alone (`apply(..., lowrank=False)`), and LESS."""
PROTOCOLS = ("aware", "agnostic")
"""The task suite's two ways a cache meets the question: compressed with it in the prompt, or before it arrives."""
SUITE_SETTINGS = {"lambda": ("lambda", "sum"), "h2o": ("h2o", "sum"), "h2o-window": ("h2o", "window")}
"""The suite's policy settings by name: (policy kind, H2O's prompt ranking). As sparse policies they are
StreamingLLM, H2O and SnapKV."""
SUITE_METHODS = ("full",) + tuple(f"{memory}/{setting}" for memory in ("sparse", "baseline_plus", "less")
                                  for setting in SUITE_SETTINGS)
"""The task suite's methods: the full cache, then each setting's sparse policy, Baseline+ and LESS."""
TASKS = ("needle_noise", "needle_text", "multikey", "multivalue", "multiquery", "variable_tracking", "common_words",
         "frequent_words", "fact_qa")
"""The task suite's tasks (`eval.tasks`)."""
