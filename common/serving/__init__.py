"""Serving one tier: the runtime, batching, request handling, the gRPC server and next-tier client, health, security,
metrics, host tuning and the tier entry point. Importing this package has no side effects."""
