"""What a correction did, per site and in total: the reports of :func:`~prune_repair.engine.correct.repair.repair_`.

Example:
    >>> site = SiteReport("fc1", "skipped", 8, skipped="it never ran on the calibration data")
    >>> RepairReport("repair", "exact", 1, 0.0, [site]).skipped
    {'fc1': 'it never ran on the calibration data'}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sites.fold import Correction


@dataclass
class SiteReport:
    """What happened at one site: ``mode`` is the correction applied there, or ``"skipped"``
    with the reason in ``skipped``."""

    fqn: str
    mode: str
    channels: int
    dead_channels: list[int] = field(default_factory=list)
    shift_dropped: bool = False
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RepairReport:
    """Result of :func:`~prune_repair.engine.correct.repair.repair_`; ``corrections`` holds the folded affine of each site."""

    mode: str
    variant: str
    passes: int
    seconds: float
    sites: list[SiteReport]
    corrections: dict[str, Correction] = field(default_factory=dict, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def repair(self) -> str:
        """The correction asked for (same as ``mode``; the name used by the API and the CLI)."""
        return self.mode

    @property
    def dead_channels(self) -> dict[str, list[int]]:
        """Channels left alone because their spread was zero or non-finite, per site."""
        return {s.fqn: s.dead_channels for s in self.sites if s.dead_channels}

    @property
    def skipped(self) -> dict[str, str]:
        """Sites that were not corrected, with the reason."""
        return {s.fqn: s.skipped for s in self.sites if s.skipped}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "variant": self.variant,
            "passes": self.passes,
            "seconds": self.seconds,
            "sites": [s.to_dict() for s in self.sites],
            **self.extra,
        }
