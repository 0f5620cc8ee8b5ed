"""The `hss-ee` command line (`main`): convert, serve, generate, classify, push, demo.

Heavy modules (torch, transformers) are imported inside each command, so `hss-ee --help` stays quick.
"""

from .main import main

__all__ = ["main"]
