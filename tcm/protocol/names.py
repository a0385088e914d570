"""Names the protocol carries and every role checks the same way."""

from __future__ import annotations

import re

__all__ = ["NODE_NAME"]

#: A relay node's name (task server or gateway): in its link hello, its certificate's
#: subject (``node:NAME``), ``tcm taskservers enroll NAME`` and a gateway's ``--task-server``.
NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
