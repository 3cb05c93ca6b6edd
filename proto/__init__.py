"""Protocol buffer sources and generated modules (see splitserve/v1/generate.proto)."""
