"""The mechanism on plain torch tensors and the compiled ops; never imports transformers.

policy (what a policy keeps, its budget in tokens, Baseline+), ranking (which token leaves first, which query rows
rank a prompt), state (`SlotCache`: one layer's slots and low-rank state), ops (the compiled ops), prefill and
compressed_layer (what a compressed layer does with a prompt and with new tokens), step_attention (the decode output
at every step of whole sequences, for training), feature_maps (φ/ψ and their checkpoint format), and reference: the
pure-PyTorch ground truth, which only the ops' backward passes, the parallel evaluation form and the tests import.
"""
