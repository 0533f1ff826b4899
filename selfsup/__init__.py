"""selfsup: self-supervised representation learning by instance discrimination."""
__version__ = "0.1.0"
