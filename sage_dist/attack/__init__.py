"""Adversarial prompt search: SAGE's inside-out text-space attack and AdvUnlearn's outside-in UNet attack."""
