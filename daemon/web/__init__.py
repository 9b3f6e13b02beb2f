"""The status page and /metrics: an HTTP server inside the daemon (docs/web.md)."""
