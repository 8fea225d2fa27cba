"""Refine stage: detect, identities, swap, upscale, blend."""
