"""Bad samples under `skip_invalid`: those found when the data opens are logged (the first LOGGED one by one, then a
running count) and counted per reason; one that fails on first use is logged and replaced by a stand-in. Nothing
leaves a run silently."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOGGED = 50


class Skips(Counter):
    """Skipped samples per reason; `add` logs each skip with `log`."""

    def __init__(self, log: logging.Logger, what: str):
        super().__init__()
        self.log, self.what = log, what

    def add(self, reason: str, detail: str) -> None:
        self[reason] += 1
        total = self.total()
        if total <= LOGGED:
            self.log.warning("skipped %s %d: %s", self.what, total, detail)
        elif total % LOGGED == 1:
            self.log.warning(
                "skipped %d %s so far (%s); only the first %d are logged one by one",
                total,
                self.what,
                dict(self),
                LOGGED,
            )


def load_or_stand_in(
    load: Callable[[int], T],
    index: int,
    candidates: Iterable[int],
    *,
    skip: bool,
    log: logging.Logger,
    what: str,
    tries: int = 32,
) -> T:
    """`load(index)`; when that raises ValueError (a sample that fails on first use, e.g. a corrupt image) and
    `skip`, the first of `candidates` (up to `tries`) that loads takes its place, logged, so a planned batch keeps
    its shape and a resumed run makes the same choice. Without `skip`, or with no stand-in, the error stands."""
    try:
        return load(index)
    except ValueError as error:
        if not skip:
            raise
        for candidate in itertools.islice(candidates, tries):
            try:
                item = load(candidate)
            except ValueError:
                continue
            log.warning("skipped %s %d on use: %s; %s %d takes its place", what, index, error, what, candidate)
            return item
        raise ValueError(f"{error}; no other {what} could take its place") from error


def after(index: int, n: int) -> Iterator[int]:
    """The indices after `index`, wrapping around: where stand-ins are looked for."""
    return ((index + k) % n for k in range(1, n))
