"""Non-invertible networks used inside the flow (coupling networks, noise network g)."""
