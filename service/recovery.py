"""Recovery at start: finish what a crash interrupted, and apply the configured retention.

A crash between the last rank's close and the stored result leaves an
evaluation open with every rank closed; no rank will close it again, so the
next start finalizes it. A lowered ``retention_keep_latest`` takes effect in
every series at once instead of waiting for each series' next finalize.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from evalstream.service.errors import ServiceError
from evalstream.service.finalizer import Finalizer
from evalstream.service.store.base import EvaluationRow, Store

log = logging.getLogger(__name__)


async def recover(store: Store, finalizer: Finalizer, in_io: Callable[..., Awaitable[Any]]) -> None:
    pending: list[EvaluationRow] = await in_io(store.pending_finalize)
    for row in pending:
        try:
            await finalizer.finalize(row.evaluation_id)
        except ServiceError as exc:
            log.warning("could not finalize %s after restart: %s", row.key.name, exc.message)
    keep = store.policy.retention_keep_latest
    if keep > 0:
        dropped: list[str] = await in_io(store.apply_retention)
        if dropped:
            log.info("retention (keep latest %d): dropped records of %d evaluations", keep, len(dropped))
