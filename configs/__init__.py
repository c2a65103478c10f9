"""Experiment configs: `base.py` declares and comments every key; the others override a few."""
