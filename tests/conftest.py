"""Shared pytest setup. pytest-twisted runs the real reactor for tests that need sockets."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
