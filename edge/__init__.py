"""The edge tier: middle segment and exit, between device and cloud."""
