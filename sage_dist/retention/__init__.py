"""Retain prompt sets and their per-step sampling (docs/METHOD.md "The total loss", §2)."""
