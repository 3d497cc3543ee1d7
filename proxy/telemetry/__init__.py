"""Metrics, traces and their settings: used by every part, using none of them."""
