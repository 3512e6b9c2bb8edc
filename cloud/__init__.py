"""The cloud tier: last segment and the final classifier; it answers every sample it receives."""
