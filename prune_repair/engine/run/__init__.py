"""Going over the calibration data: hooked passes, lockstep batches, block by block, across ranks.

Nothing here knows what is measured or corrected; the steps that do live in
:mod:`~prune_repair.engine.stats`, :mod:`~prune_repair.engine.correct` and
:mod:`~prune_repair.engine.refit`.
"""
