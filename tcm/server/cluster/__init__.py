"""Several management server nodes on one PostgreSQL database and one Redis: a cluster.

PostgreSQL holds the truth (jobs, targets, agents, settings, the CA sealed); Redis carries
what may be lost and rebuilt: which node holds which agent's session (presence, with an
expiry each node's heartbeat refreshes) and the bus (one channel per node, one for all, one
for events). Every node also re-reads its unfinished jobs from PostgreSQL now and then, so a
message the bus lost costs a delay, never a job (docs/operating.md, "A cluster of nodes").

    secrets.py  the CA and admin token every node takes from the first (sealed at rest)
    bus.py      the Redis client: commands on a thread pool, subscriptions on a thread
    node.py     ClusterNode: heartbeat, presence, job fan-out, changes to every node
"""
