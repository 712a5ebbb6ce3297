"""Serving: an OpenAI-compatible server with continuous batching, an A/B router, monitoring."""
