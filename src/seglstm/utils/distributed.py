"""torch.distributed pieces shared by DDP training and multi-rank scene inference."""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def restart_scoped_store(timeout: timedelta) -> torch.distributed.Store | None:
    """torchrun's shared store seen under a prefix unique to this restart, or None outside an elastic agent.

    The elastic agent keeps one TCPStore for the whole job (static and c10d rendezvous alike, torch 2.14), and
    ``init_process_group`` publishes each rank's address there under fixed key names. After a restart, a rank
    can read the address its peer published in the previous attempt and fail with "Connection refused", or
    wait for the store timeout. Scoping the keys by ``TORCHELASTIC_RESTART_COUNT`` keeps attempts apart, as
    torch itself did before 2.4.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return None
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return torch.distributed.PrefixStore(f"seglstm/restart_{attempt}", store)
