"""Invertible layers. Each has `forward(x) -> (z, logdet[B])` and `inverse(z) -> x`."""
