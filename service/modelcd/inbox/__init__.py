"""The inbox: every authenticated webhook delivery, stored before it is acknowledged, then
processed at least once (and, through idempotent imports, exactly once)."""
