"""The user-facing edge: request lifecycle, gRPC and OpenAI-compatible HTTP servers, client."""
