"""Coordination between daemons: lock backends, leases, the file-claim policy and single flight."""
