"""Retain prompt sets and their per-step sampling (spec §1.7, §2)."""
