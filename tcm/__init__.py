"""tcm: time-critical endpoint management on Twisted."""

__version__ = "0.1.0"
