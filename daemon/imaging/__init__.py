"""Pure image work: decode, fingerprint, match, render, deliverables, PNG, colour, metadata."""
