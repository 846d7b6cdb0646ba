"""The end of every ``accelerate`` (peft's and AdapterHub's): log the summary and attach it."""
from __future__ import annotations

import logging

log = logging.getLogger("peftops")


def attach(model, summary, what: str, return_summary: bool):
    """Log ``summary`` (a warning when nothing was found or something was left) and set it as
    ``model.peftops_summary``; returns what ``accelerate`` returns."""
    if not summary.swapped and not summary.left:
        log.warning("peftops.accelerate: no %s found in %s", what, type(model).__name__)
    elif summary.left:
        log.warning("%s", summary)
    else:
        log.info("%s", summary)
    model.peftops_summary = summary
    return (model, summary) if return_summary else model
