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
tcmTaskServer = ServiceMaker(
    "tcm task server",
    "tcm.taskserver.tap",
    "tcm task server (agents' task sessions, relayed to the management server)",
    "tcm-taskserver",
)
tcmAllInOne = ServiceMaker(
    "tcm all-in-one",
    "tcm.allinone",
    "tcm management server and task server in one process (embedded defaults)",
    "tcm",
)
tcmGateway = ServiceMaker(
    "tcm internet gateway",
    "tcm.gateway.tap",
    "tcm internet gateway (agents' sessions and HTTPS relayed to several servers)",
    "tcm-gateway",
)
