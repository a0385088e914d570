"""The task server: holds agents' task-client sessions and relays tasks to them."""

WS_PATH = "/task/v1/ws"
