"""KV transfer of tensor-parallel workers: each rank moves its own KV heads (see ``group``).

``GroupSender`` / ``GroupReceiver`` (``group``) are what prefill / decode workers use for
any tensor-parallel size (one rank: today's path, unchanged); ``agent`` runs a rank's part
in that rank's process; ``link`` connects rank 0 to the others."""

from kv_transfer.group.group import GroupEndpoint, GroupReceiver, GroupSender, rank_heads

__all__ = ["GroupEndpoint", "GroupReceiver", "GroupSender", "rank_heads"]
