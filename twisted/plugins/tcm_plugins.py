"""twistd dropins for tcm: each line names a service; the module is imported only when used."""

from twisted.application.service import ServiceMaker

tcmServer = ServiceMaker(
    "tcm management server",
    "tcm.server.tap",
    "tcm management server (API, agents, jobs)",
    "tcm-server",
)
tcmAgent = ServiceMaker(
    "tcm endpoint agent",
    "tcm.agent.tap",
    "tcm endpoint agent",
    "tcm-agent",
)
