"""Per-channel corrections: the modes (REPAIR, RESCALE, RESET, ...), their plans and the repair router."""
