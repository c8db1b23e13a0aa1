"""The package version, in one place (imported by pyro_vae and written into its outputs)."""

__version__ = "0.1.0"
