"""What LESS buys, measured: perplexity in three forms, passkey retrieval, generation timing, and their plots."""
