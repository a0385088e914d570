"""Every zope.interface of tcm, in one place."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ActionFailed(Exception):
    """Raised by an action or policy handler to report a failure with a reason."""

    def __init__(self, reason: str, result: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.result = result or {}


class IActionContext(Interface):
    """What an action handler gets from the agent while it runs one job."""

    job_id = Attribute("The job id (str).")
    timeout = Attribute("Seconds the job may run (float), or None.")
    reactor = Attribute("The reactor to use for processes, timers and I/O.")
    state_dir = Attribute("A FilePath of a directory the handler may use for its own files.")

    def output(stream: str, text: str) -> None:  # type: ignore[misc]
        """Stream a chunk of output ("stdout" / "stderr" / "log") to the server as progress."""


class IActionHandler(Interface):
    """An action an agent can run: discovered with getPlugins(IActionHandler, tcm.plugins)."""

    name = Attribute("Action name on the wire, e.g. 'inventory.collect' ([a-z][a-z0-9_.-]*).")
    streams = Attribute("True when the handler sends output while it runs.")
    task = Attribute("True when the action runs as a task (through a task server when present).")
    schema = Attribute("JSON Schema (dict) of the action's arguments.")

    def run(context: IActionContext, args: dict):  # type: ignore[misc]
        """Run the action with validated args.

        Returns a JSON-serialisable dict (the result) or a Deferred firing with one. Raising
        (or failing the Deferred with) `ActionFailed` (above) reports a failure with that
        reason. Cancelling the Deferred (on timeout) must stop the work (kill a process).
        """


class IPolicyContext(Interface):
    """What a policy handler gets from the agent for one version of one policy."""

    policy = Attribute("The policy's name (str).")
    version = Attribute("The policy's version (int).")
    restored = Attribute(
        "True when the agent re-applies a stored policy at its start rather than a new version "
        "just received: a handler may skip what it does once per version (an immediate run)."
    )
    reactor = Attribute("The reactor: its clock for schedules, processes, threads.")
    state_dir = Attribute("A FilePath of a directory the handler may use for its own files.")

    def schedule(spec: dict, run, now: bool = False):  # type: ignore[misc]
        """Call `run()` on a schedule: spec {"every": seconds} or {"cron": "m h dom mon dow"}
        (validate it with SCHEDULE_SCHEMA below). `now`: also once at once. Returns an object
        with `stop()`. A Deferred returned by `run` is waited for before the next run is
        planned, so runs of one policy never overlap."""

    def run_action(name: str, args: dict):  # type: ignore[misc]
        """Run one of the agent's actions locally (its arguments checked against its schema);
        a Deferred firing with the action's result dict, or failing with ActionFailed."""

    def report(result: dict | None = None, error: str | None = None):  # type: ignore[misc]
        """Send the outcome of one run to the server (kept as the policy's `last_run`).
        Returns a Deferred of the server's answer (a dict), or of None when it was not
        delivered (best effort: never fails)."""

    def set_agent_settings(settings: dict) -> None:  # type: ignore[misc]
        """Change the agent's own settings (what `agent.settings` documents name); an empty
        dict restores the agent's defaults."""


class IAppliedPolicy(Interface):
    """A policy version in force on an agent, as `IPolicyHandler.apply` returns it."""

    def stop():  # type: ignore[misc]
        """The version is replaced or the policy no longer applies: undo what apply set up
        (cancel schedules). May return a Deferred."""


class IPolicyHandler(Interface):
    """A type of policy document an agent can apply: getPlugins(IPolicyHandler, tcm.plugins)."""

    type = Attribute("Policy type name, e.g. 'inventory.schedule' ([a-z][a-z0-9_.-]*).")
    schema = Attribute("JSON Schema (dict) of the policy document.")

    def apply(context: IPolicyContext, document: dict):  # type: ignore[misc]
        """Put a (validated) policy document in force: returns an IAppliedPolicy (None:
        nothing to undo) or a Deferred of one. Raising (or failing with) `ActionFailed`
        reports the policy failed here."""


# A schedule in a policy document, for handlers' schemas: every N seconds, or a cron line
# (minute hour day-of-month month day-of-week; `*`, `*/n`, `a-b`, `a,b`; local time).
SCHEDULE_SCHEMA: dict = {
    "every": {"type": "number", "minimum": 1},
    "cron": {"type": "string", "minLength": 9, "maxLength": 128},
}


# -- the management server's services (built and wired by make_server_service) -------------
# Each consumer (admin API, agent API, node API, WebSocket and link endpoints, hub, metrics)
# is given only the services it uses; make_server_service checks each with verifyObject.
# Services raise tcm.server.errors (NotFound, Conflict, Invalid, Forbidden, ...), never HTTP.


class IEventPublisher(Interface):
    """Where the server's state changes are told (tcm/server/events.py): the one interface
    publishers know, so a cluster's bus can stand in for one node's hub."""

    def publish(event) -> None:  # type: ignore[misc]
        """Tell subscribers of `event.topic` (an events.Event); never blocks, never fails."""


class IEventHub(IEventPublisher):
    """One node's subscriptions of the console's live events."""

    clock = Attribute("The clock batches are timed on (IReactorTime).")

    def subscribe(topics, sink, close):  # type: ignore[misc]
        """A Subscription: batches of the topics' events go to `sink(batch)`; `close(reason)`
        ends the client's stream when it is dropped."""

    def subscribers(topic=None) -> int:  # type: ignore[misc]
        """How many subscriptions there are (of `topic`)."""


class IRuntimeSettings(Interface):
    """Settings an admin changes while the server runs; read as a mapping (`s["long_poll"]`)."""

    def __getitem__(key):  # type: ignore[misc]
        """A setting's value."""

    def as_dict():  # type: ignore[misc]
        """All settings as a dict."""

    def persistent_enabled():  # type: ignore[misc]
        """Whether agents may hold persistent (WebSocket) sessions now."""

    def when_persistent_off(callback):  # type: ignore[misc]
        """Call `callback()` whenever persistent connections are switched off."""

    def load():  # type: ignore[misc]
        """Take the stored values (Deferred)."""

    def change(changes):  # type: ignore[misc]
        """Validate, store and apply changes; Deferred of all settings."""


class IAgentPresence(Interface):
    """Where agents are: live sessions (own and task), held polls, last polls."""

    registry = Attribute("SessionRegistry of agents' own sessions.")
    task_registry = Attribute("SessionRegistry of agents' task sessions (via task servers).")
    polls = Attribute("PollRegistry of held long-polls.")
    closing_everything = Attribute("True once a stop closes every session.")
    clones = Attribute("CloneWatch: identities found cloned (sessions.py).")

    def admit_session(session):  # type: ignore[misc]
        """Whether an agent's own session may open (False: its identity is cloned)."""

    def session(agent_id):  # type: ignore[misc]
        """The agent's own live session, or None."""

    def capabilities_of(agent_id):  # type: ignore[misc]
        """Capabilities of the agent's live session, or None."""

    def agent_polled(agent_id):  # type: ignore[misc]
        """An agent in HTTP mode polled now."""

    def http_mode_of(agent_id):  # type: ignore[misc]
        """ "http" for an agent without a session that polled lately; else None."""

    def sweep_polls():  # type: ignore[misc]
        """Publish `offline` for agents in HTTP mode whose poll window passed (Deferred of
        their ids)."""

    def last_seen(agent_id, stored):  # type: ignore[misc]
        """When the agent was last heard of."""

    def close_agent(agent_id, code):  # type: ignore[misc]
        """Close the agent's sessions with a close code."""

    def closing_all(code):  # type: ignore[misc]
        """Close every direct session at a stop: (count, Deferred of the last-seen write)."""

    def sessions_gone(timeout):  # type: ignore[misc]
        """Deferred: no direct session is left, or `timeout` passed."""

    def sweep_silent_sessions():  # type: ignore[misc]
        """Close half-open sessions."""


class IAgentAdmission(Interface):
    """Agent admission and directory: who may be served, enrollment, approval, revocation."""

    def known_ids():  # type: ignore[misc]
        """Ids of agents not revoked."""

    def revoked_ids():  # type: ignore[misc]
        """Ids of revoked agents."""

    def pending_ids():  # type: ignore[misc]
        """Ids of agents awaiting approval."""

    def renew(agent_id, csr):  # type: ignore[misc]
        """A new certificate for an agent's new key, same identity: {certificate, ca}."""

    def count():  # type: ignore[misc]
        """How many agents are enrolled."""

    def list_agents():  # type: ignore[misc]
        """Deferred of every agent's row."""

    def agents_page(after, limit, include_deleted, state):  # type: ignore[misc]
        """Deferred of (rows in id order after `after`, at most `limit`; the next page's
        `after` or None)."""

    def get_agent(agent_id):  # type: ignore[misc]
        """Deferred of an agent's row; NotFound."""

    def check_agent(agent_id):  # type: ignore[misc]
        """The agent id if it may be served now; Forbidden otherwise."""

    def authenticate_transport(transport):  # type: ignore[misc]
        """The agent id of a connection's client certificate; Forbidden."""

    def authenticate_proxied(transport, escaped_pem):  # type: ignore[misc]
        """The agent id of a certificate a reverse proxy forwards; Forbidden."""

    def enroll(token, csr, hostname):  # type: ignore[misc]
        """Deferred of (asked_again, {agent_id, certificate, ca})."""

    def approve(agent_id):  # type: ignore[misc]
        """Deferred of whether the agent was approved now; NotFound."""

    def revoke(agent_id):  # type: ignore[misc]
        """Deferred of whether the agent was revoked now; NotFound."""

    def delete(agent_id):  # type: ignore[misc]
        """Deferred of whether the agent was deleted (revoked and hidden) now; NotFound."""

    def label(agent_id, name=None, tags=None, untag=None, reset_name=False):  # type: ignore[misc]
        """Deferred of the agent's row with its new display name and tags; NotFound."""

    def session_seen(agent_id, hello, capabilities):  # type: ignore[misc]
        """An agent's session opened: stored as seen."""

    def session_left(agent_id):  # type: ignore[misc]
        """An agent's session closed: stored as seen."""


class IAccessTokens(Interface):
    """Authentication and tokens: admin API bearer tokens and enrollment tokens."""

    admin_token = Attribute("The bootstrap admin token (admin.token).")

    def load():  # type: ignore[misc]
        """Read the active API tokens (Deferred)."""

    def authenticate(token):  # type: ignore[misc]
        """The Principal of a bearer token; Unauthenticated."""

    def create_enrollment_token(ttl, uses, description, profile):  # type: ignore[misc]
        """Deferred of a new enrollment token."""

    def enrollment_tokens():  # type: ignore[misc]
        """Deferred of the enrollment tokens."""

    def revoke_enrollment_token(token_id):  # type: ignore[misc]
        """Deferred of whether the enrollment token was revoked now; NotFound."""

    def check_token_name(name):  # type: ignore[misc]
        """Invalid for a name no API token may have."""

    def create_api_token(name, role, target, ttl, created_by):  # type: ignore[misc]
        """Deferred of (token, row); Conflict."""

    def api_tokens():  # type: ignore[misc]
        """Deferred of the API tokens (without secrets)."""

    def revoke_api_token(name):  # type: ignore[misc]
        """Deferred of the revoked ids; NotFound."""


class ITargets(Interface):
    """Targets and selection: saved targets and groups, members now."""

    def agent_views(roots=frozenset()):  # type: ignore[misc]
        """Deferred of the views filters are evaluated on."""

    def resolve_target(name):  # type: ignore[misc]
        """Deferred of a target's member ids (UnknownTarget, FilterError)."""

    def resolve_targets(names=None):  # type: ignore[misc]
        """Deferred of {target: member ids}."""

    def members(name, field="target"):  # type: ignore[misc]
        """Deferred of a target's member ids; NotFound, Invalid."""

    def scope(name):  # type: ignore[misc]
        """Deferred of the members of a token's scope (empty if gone)."""

    def select(body):  # type: ignore[misc]
        """Deferred of ("filter", text) or ("agents", ids) for a selection."""

    def selection(body):  # type: ignore[misc]
        """Deferred of a selection's member rows."""

    def exists(name):  # type: ignore[misc]
        """Deferred of whether a target is saved."""

    def create_target(body, created_by):  # type: ignore[misc]
        """Deferred of (view, audit details); Invalid, Conflict."""

    def list_targets():  # type: ignore[misc]
        """Deferred of target views."""

    def get_target(name):  # type: ignore[misc]
        """Deferred of a target's view with its member count; NotFound."""

    def member_rows(name):  # type: ignore[misc]
        """Deferred of a target's member rows; NotFound."""

    def delete_target(name):  # type: ignore[misc]
        """Deferred; NotFound."""

    def create_group(body):  # type: ignore[misc]
        """Deferred of (row, agents); Invalid, Conflict."""

    def list_groups():  # type: ignore[misc]
        """Deferred of the groups."""

    def get_group(name):  # type: ignore[misc]
        """Deferred of a group; NotFound."""

    def delete_group(name):  # type: ignore[misc]
        """Deferred; NotFound."""

    def change_group(name, add, remove):  # type: ignore[misc]
        """Deferred of the group's row; Invalid, NotFound."""


class IInventory(Interface):
    """Agents' stored inventories and their freshness."""

    def of_agent(agent_id):  # type: ignore[misc]
        """Deferred of {class: data}; NotFound."""

    def stale(older_than, target, classes):  # type: ignore[misc]
        """Deferred of (stale items, digests); Invalid, NotFound."""

    def history(agent_id, cls):  # type: ignore[misc]
        """Deferred of the versions kept of an agent's classes (cls None: all); NotFound."""

    def version(agent_id, cls, version):  # type: ignore[misc]
        """Deferred of one version of a class with its data (version None: current); NotFound."""

    def diff(agent_id, cls, old, new):  # type: ignore[misc]
        """Deferred of {agent, class, from, to, added, removed, changed}; NotFound."""


class IJobs(Interface):
    """Jobs from creation to stored results."""

    def active_count():  # type: ignore[misc]
        """Jobs with unfinished targets."""

    def create(action, args, targets, ttl, timeout, created_by=""):  # type: ignore[misc]
        """Deferred of the new job's id; Invalid."""

    def list_jobs():  # type: ignore[misc]
        """Deferred of every job."""

    def status(job_id, results=True):  # type: ignore[misc]
        """Deferred of a job's counts (and results); NotFound."""

    def stored_output(job_id, after):  # type: ignore[misc]
        """Deferred of output chunks after `after`."""

    def output_waiter(job_id, timeout):  # type: ignore[misc]
        """Deferred firing at the job's next output or after `timeout`."""

    def agents_in_states(job_id, states):  # type: ignore[misc]
        """Deferred of a job's target ids in those states; NotFound."""

    def session_opened(agent_id, channel="core"):  # type: ignore[misc]
        """An agent's session opened: deliver what waits for it."""

    def work_for(agent_id):  # type: ignore[misc]
        """Jobs for an agent in HTTP mode."""

    def accept(agent_id, job_id):  # type: ignore[misc]
        """The agent accepts a job: run, wait or drop."""

    def output(agent_id, job_id, seq, stream, text):  # type: ignore[misc]
        """Store a chunk of a job's output."""

    def result(agent_id, job_id, state, result, error, started, finished, received):  # type: ignore[misc]
        """Deferred of whether the result was stored; Invalid, Conflict."""

    def cancels_for(agent_id):  # type: ignore[misc]
        """`action.cancel` envelopes (objects) for a polling agent's canceled running jobs."""

    def cancel(job_id, agent_ids, by=""):  # type: ignore[misc]
        """Deferred of {"canceled": [...], "stopping": [...]}: a job's unfinished targets
        (all, or `agent_ids`') canceled; NotFound, Invalid."""

    def actions():  # type: ignore[misc]
        """What enrolled agents advertise: [{name, agents, task, streams, schema}]."""


class IPolicies(Interface):
    """Policies: storage, resolution to agents, PushPolicy, agents' reports."""

    policies = Attribute("{name: policy} in force.")

    def known_policy_types():  # type: ignore[misc]
        """Policy type names this server or its agents know."""

    def policy_view(policy):  # type: ignore[misc]
        """A policy as the admin API shows it."""

    def get_policy(name):  # type: ignore[misc]
        """A policy; NotFound."""

    def members(targets):  # type: ignore[misc]
        """Deferred of the agents in any of the targets."""

    def running(agent_id):  # type: ignore[misc]
        """What an agent reports running (policies and profile)."""

    def create_policy(body):  # type: ignore[misc]
        """Deferred of the new policy's view."""

    def update_policy(name, body):  # type: ignore[misc]
        """Deferred of the policy's new view."""

    def delete_policy(name):  # type: ignore[misc]
        """Deferred."""

    def push(name, wait=10.0):  # type: ignore[misc]
        """Deferred of what each agent did with the pushed policy."""

    def policies_for(agent_id):  # type: ignore[misc]
        """Deferred of the policies that apply to an agent."""

    def report_policies(agent_id, reports):  # type: ignore[misc]
        """An agent reports what it runs."""

    def notices_for(agent_id):  # type: ignore[misc]
        """Notices an agent in HTTP mode picks up at its poll."""

    def session_opened(agent_id, hello):  # type: ignore[misc]
        """An agent's session opened."""


class IProfiles(Interface):
    """Connection profiles: storage, assignment to agents, agents' reports."""

    profiles = Attribute("{name: profile}.")

    def profile_view(profile):  # type: ignore[misc]
        """A profile as the admin API shows it."""

    def get_profile(name):  # type: ignore[misc]
        """A profile; NotFound."""

    def create_profile(body):  # type: ignore[misc]
        """Deferred of the new profile's view."""

    def update_profile(name, body):  # type: ignore[misc]
        """Deferred of the profile's new view."""

    def delete_profile(name):  # type: ignore[misc]
        """Deferred."""

    def set_enrollment_profile(agent_id, profile):  # type: ignore[misc]
        """Deferred: the profile an enrollment token named."""

    def profile_for(agent_id):  # type: ignore[misc]
        """Deferred of the profile that applies to an agent."""

    def report_profile(agent_id, body):  # type: ignore[misc]
        """An agent reports the profile it runs."""

    def session_opened(agent_id, hello):  # type: ignore[misc]
        """An agent's session opened: the profile its hello says it runs."""


class IAudit(Interface):
    """The audit log."""

    def record(who, action, obj="", details=None):  # type: ignore[misc]
        """Deferred: an entry is committed."""

    def entries(since, limit, who=None, action=None):  # type: ignore[misc]
        """Deferred of entries; Invalid."""

    def refused(who, method, path, status, reason):  # type: ignore[misc]
        """Record a refused request (401/403); Deferred."""


class IJobHistory(Interface):
    """Past jobs: filtered pages, results as CSV, and their purge after the retention."""

    def page(state=None, action=None, since=None, limit=100, before=None):  # type: ignore[misc]
        """Deferred of {"jobs", "next"}; Invalid."""

    def results_csv(job_id):  # type: ignore[misc]
        """Deferred of CSV text; NotFound."""

    def purge():  # type: ignore[misc]
        """Deferred of how many jobs were purged (by age, then by size)."""

    store_figures = Attribute("The store's size as last measured (dict).")

    def measure():  # type: ignore[misc]
        """Deferred of the store's size now (dict), kept as store_figures."""

    def retention():  # type: ignore[misc]
        """What retention keeps: {job_retention, result_bytes_per_job, ...}."""


class INodeRegistry(Interface):
    """Task servers and gateways: registration, enrollment, live links, assignments."""

    links = Attribute("Live links by key.")
    assignments = Attribute("TaskServerAssignments of agents to task servers.")

    def reload():  # type: ignore[misc]
        """Read the records again (Deferred)."""

    def refusal(name, fingerprint):  # type: ignore[misc]
        """Why a link from that node is refused, or None."""

    def gateway_fingerprints(previous=False):  # type: ignore[misc]
        """{gateway: certificate fingerprint} of enrolled gateways (with `previous`: of
        the certificates they renewed last)."""

    def register(name, role, max_clients, ttl):  # type: ignore[misc]
        """Deferred of the one-time secret; Conflict."""

    def enroll(name, token, csr, hostnames):  # type: ignore[misc]
        """Deferred of {name, role, certificate, ca}; Invalid, Forbidden."""

    def renew(name, current, csr):  # type: ignore[misc]
        """Deferred of {certificate, ca} for the node's new key, its current certificate
        (a verified client certificate) as proof; Invalid, Forbidden, Conflict."""

    def link_up(node):  # type: ignore[misc]
        """A node linked."""

    def link_down(node):  # type: ignore[misc]
        """A link was lost: the agents that lose their task server (None: superseded)."""

    def tell_pending(agent_ids, approved=None):  # type: ignore[misc]
        """Tell gateways which agents await approval."""

    def tell_revoked(agent_ids):  # type: ignore[misc]
        """Tell gateways which agents are revoked."""

    def remove(name, role):  # type: ignore[misc]
        """Deferred of (changed, agents without a task server now); NotFound."""

    def task_server_views():  # type: ignore[misc]
        """Task servers with state and client counts."""

    def gateway_views():  # type: ignore[misc]
        """Gateways with their links."""


class IClusterBus(Interface):
    """The bus between the server nodes of a cluster, and where their presence lives."""

    up = Attribute("Whether the bus is connected now.")
    down_reason = Attribute("Why it is not (text), when it is not.")

    def start(on_message, on_state):  # type: ignore[misc]
        """Subscribe: on_message(dict) for this node's and everyone's messages,
        on_state(bool) at each change of `up`."""

    def stop():  # type: ignore[misc]
        """Unsubscribe and stop its threads."""

    def send(node, message):  # type: ignore[misc]
        """Deferred: one message (a dict) to one node."""

    def broadcast(message):  # type: ignore[misc]
        """Deferred: one message to every node."""

    def publish_events(events):  # type: ignore[misc]
        """Deferred: a batch of events for whoever listens (the console)."""

    def add_event_listener(listener):  # type: ignore[misc]
        """listener(dict) receives every node's event batches from now on."""

    def refresh_presence(ttl, added, removed, full):  # type: ignore[misc]
        """Deferred: this node is alive `ttl` seconds more, with these agents."""

    def leave():  # type: ignore[misc]
        """Deferred: this node's presence goes now."""

    def routes(agent_ids):  # type: ignore[misc]
        """Deferred {node: [agent ids it holds]} over every live node."""

    def share_topics(ttl, topics):  # type: ignore[misc]
        """Deferred: this node's console subscribers' topics (kept `ttl` seconds), fired with
        the union of every other live node's topics."""


class ICluster(Interface):
    """This server's place in a cluster of nodes: what the other services tell it, and what
    the admin API asks of it."""

    name = Attribute("This node's name.")

    def job_created(job_id, agent_ids):  # type: ignore[misc]
        """A job was committed here: one message to each other node with its recipients."""

    def changed(area, ids=None):  # type: ignore[misc]
        """An admin change (agents, settings, policies, profiles, targets, access, cancel)
        that every node must apply to its own agents."""

    def event(event):  # type: ignore[misc]
        """An event (a dict) for the events channel (batched)."""

    def status():  # type: ignore[misc]
        """{"node", "bus", "bus_reason"}: for /status and /metrics."""

    def nodes():  # type: ignore[misc]
        """Deferred list of every node: name, address, sessions, state, last heartbeat."""

    def where(agent_ids):  # type: ignore[misc]
        """Deferred {agent: node} of those agents whose sessions other live nodes hold."""


class ICertificates(Interface):
    """Certificates signed by the server's CA, and the server's own TLS identity."""

    ca_pem = Attribute("The CA certificate (PEM bytes).")

    def sign_agent(csr_pem, agent_id, days):  # type: ignore[misc]
        """An agent's certificate (PEM); ValueError."""

    def sign_node(csr_pem, name, days, hostnames):  # type: ignore[misc]
        """A node's certificate (PEM); ValueError."""

    def verify_issued(cert):  # type: ignore[misc]
        """The subject of a certificate this CA issued; ValueError."""

    def server_identity(config):  # type: ignore[misc]
        """This server's (key_pem, cert_pem)."""


class IInstallPackages(Interface):
    """Agent install packages built by the server (tcm/server/packages.py), off the reactor
    thread: the wheels first (cached per tcm version), then the archive."""

    def wheels():  # type: ignore[misc]
        """Deferred of the package's `Wheels` (tcm/installpackage.py); Unavailable (with
        the reason) when they cannot be had."""

    def assemble(profile, ca_pem, server, token, uses, ttl, wheels):  # type: ignore[misc]
        """Deferred of the package (.tar.gz bytes) holding these (the token valid `ttl`
        seconds from now); Invalid for a server URL an agent cannot take."""


# -- the agent's parts, as its composition root (tcm/agent/service.py) wires them ------------


class IAgentAPI(Interface):
    """How the agent's parts call the server's agent API: over the live session when there
    is one, else over HTTPS (tcm/agent/link.py `ServerLink`)."""

    session = Attribute("The open core session (an AgentConnection), or None.")
    task_session = Attribute("The open task-server session, or None.")

    def call(method: str, path: str, body=None, timeout=None, via=None):  # type: ignore[misc]
        """One agent API call; a Deferred firing with a Response. `via`: the session a job
        came on, tried first while it is open."""

    def call_over_https(method: str, path: str, body=None, timeout=None):  # type: ignore[misc]
        """The same call over HTTPS only (the poller's, which stands for the session)."""


class ISessionHost(Interface):
    """What the agent's sessions (core and task) and its HTTPS polls hand on to the agent:
    what it says in its hello, and what arrives from the server."""

    clock = Attribute("The reactor's clock (IReactorTime).")

    def hello() -> dict:  # type: ignore[misc]
        """The agent's own fields of a `hello`: capabilities, running jobs, policy types,
        the connection profile in force."""

    def action_requested(env, received=None, via=None) -> None:  # type: ignore[misc]
        """An `action.request` envelope arrived (pushed on session `via`, or polled)."""

    def notified(data: dict) -> None:  # type: ignore[misc]
        """A `notify` arrived: something changed on the server (a topic in `data`)."""

    def cancel_requested(data: dict) -> None:  # type: ignore[misc]
        """An `action.cancel` arrived: an operator canceled job `data["job"]`."""

    def learn_server_time(server_time) -> None:  # type: ignore[misc]
        """The server's clock, as a welcome or a poll's answer states it."""

    def deliver_results() -> None:  # type: ignore[misc]
        """Send the spooled results now (a poll was answered, a session opened)."""


class ISessionObserver(Interface):
    """Told by the agent's connection (tcm/agent/connection.py) when its persistent session
    opens or is lost, and when HTTPS polling reached the server."""

    def session_opened(welcome: dict) -> None:  # type: ignore[misc]
        """A persistent session is open and the server welcomed it with `welcome`."""

    def session_lost(reason: str, switched_off: bool) -> None:  # type: ignore[misc]
        """The agent works without a persistent session from now on (it closed, or was
        switched off before one opened). `switched_off`: by the endpoint's user or a
        connection profile, and it stays off until switched on again; a switch-off of an
        open session is followed by the close itself (switched_off False)."""

    def polling_started() -> None:  # type: ignore[misc]
        """The first HTTPS poll of a period without a session was answered."""


class IProfileFollower(Interface):
    """Puts a connection profile's settings in force (the agent's connection does)."""

    def follow_profile(settings: dict, live: bool) -> None:  # type: ignore[misc]
        """The profile in force now has `settings` ({}: none; the command line's values).
        `live`: the agent runs (reconnect, close or open the session as they say); else it
        is starting and only takes the values before its first connection."""


class IServerConnection(Interface):
    """The agent's connection to its server, as its task client sees it."""

    proxy = Attribute("The HTTP proxy connections go through now (HTTPProxy), or None.")
    user_disconnected = Attribute("True after `tcm-agent disconnect`, until `reconnect`.")

    def session_keepalive() -> float:  # type: ignore[misc]
        """The keepalive the core session runs with now (the server's, once welcomed)."""

    def adopt_keepalive(protocol, keepalive) -> None:  # type: ignore[misc]
        """Ping on `protocol` as often as a welcome asks."""


class IAgentControl(Interface):
    """What the agent's local control socket offers (tcm-agent status/disconnect/reconnect)."""

    def status() -> dict:  # type: ignore[misc]
        """The Network Status: where the agent connects, how, and what is waiting."""

    def user_disconnect() -> dict:  # type: ignore[misc]
        """Terminate the persistent connection; stay on HTTPS."""

    def user_reconnect() -> dict:  # type: ignore[misc]
        """Allow the persistent connection again."""


class IPolicyAgent(Interface):
    """What the agent's policy engine may ask of the agent itself."""

    def run_action(name: str, args: dict):  # type: ignore[misc]
        """Run one of the agent's actions locally (no job); a Deferred of its result."""

    def set_agent_settings(settings: dict) -> None:  # type: ignore[misc]
        """Apply an `agent.settings` document; {} restores the defaults."""
