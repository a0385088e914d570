"""twistd tcm: the management server and a task server in one process, one reactor.

The same options as `twistd tcm-server`; the embedded defaults (SQLite in the state directory,
a self-made CA and certificates) make it one command to run. The task server's agent endpoint
is served on the same port (`/task/v1/ws`) and it links to the server over loopback like any
task server, so the path of a task is the same as with separate processes.
"""

from __future__ import annotations

from tcm.server.service import make_server_service
from tcm.server.tap import Options as ServerOptions
from tcm.server.tap import config_from
from tcm.taskserver.service import EmbeddedTaskServer


class Options(ServerOptions):
    synopsis = "--state-dir DIR [--port P] [--interface ADDR] [--hostname NAME ...]"
    longdesc = (
        "tcm all-in-one: management server (admin API, agents, jobs) and task server in one "
        "process. First start creates the CA, certificates, admin token and SQLite store."
    )


def makeService(options: Options):
    config = config_from(options)
    top = make_server_service(config)
    EmbeddedTaskServer(
        top.task_server_host, max_clients=config.taskserver_max_clients
    ).setServiceParent(top)
    return top
