"""Coordination between daemons: lock backends, leases and the file-claim policy."""
