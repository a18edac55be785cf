"""The release number, in a module of its own so the core can name it without importing the package root."""

__version__ = "0.1.0"
