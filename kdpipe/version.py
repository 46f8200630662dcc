"""kdpipe's version (recorded in stores and run directories)."""

__version__ = "0.1.0"
