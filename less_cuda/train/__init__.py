"""Fitting φ/ψ of a frozen model (`less-cuda train`): the layer stage, the end-to-end stage, and what they share."""
