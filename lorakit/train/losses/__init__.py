"""Losses as pure functions over log-probs (torchtune style)."""
