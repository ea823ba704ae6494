"""API keys, OAuth tokens, quotas and the usage ledger."""
