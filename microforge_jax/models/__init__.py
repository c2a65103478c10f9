"""Flax (linen) modules: the DC-VAE, the selective scan and backbone, the planner, text encoders."""
