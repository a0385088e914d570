"""Shared pytest setup. pytest-twisted runs the real reactor for tests that need sockets."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
