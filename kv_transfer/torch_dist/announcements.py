"""Announced payloads: receives posted before the KV exists (see ``send_channel``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from kv_transfer.base import TransferHandle
from kv_transfer.header import DATA_TAG, TransferHeader

if TYPE_CHECKING:  # annotations only (a runtime import would be circular)
    from kv_transfer.torch_dist.send_channel import SendJob

log = logging.getLogger(__name__)


# Announcement tags: one per announced payload of a channel, never reused while the channel
# lives (a late message on a tag can then never land in another request's blocks).
FIRST_ANNOUNCED_TAG = DATA_TAG + 1
_LAST_TAG = 2**31 - 2  # 2**31 - 1 is the link watch's (``wire.LINK_TAG``)


@dataclasses.dataclass
class _Announced:
    """An announcement not settled yet: its ANNOUNCE job (channel, tag, runs, source ids),
    the reserved ids, and its DATA header and messages made ahead (the header's bytes, the
    messages' views into the cache: None if they are gathered)."""

    job: SendJob
    dst_ids: list[int]
    data: TransferHeader
    encoded: torch.Tensor
    messages: list[torch.Tensor] | None


def _log_control_failure(handle: TransferHandle) -> None:
    if handle.error is not None:  # its channel failed: the receiver dropped the receives
        log.info("kv_transfer: announcement of %s: %s", handle.request_id, handle.error)
