"""The status refresh: the one writer of what the status views read.

One refresh folds the ledger rows added since the last one into the status aggregates
(:mod:`workbench.status`), computes each active study's data yield of the last days from its
sensor tables (once per study) and its status table, records the changes of
activity code in the history, opens and closes alerts (:mod:`workbench.alerts`), writes each
study's status CSV atomically into the pool's reports folder and mails the new alerts. The
dashboards, the attrition report and ``workbench alerts --no-refresh`` read what it left; none
of them folds.

Example::

    from workbench import load_config
    from workbench.refresh import refresh_status

    print(refresh_status(load_config("demo-home")).summary())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workbench.alerts import mail_new_alerts, update_alerts
from workbench.catalog import Catalog, borrowed_catalog, now_ms
from workbench.config import Config
from workbench.errors import MailError
from workbench.pool import DataPool
from workbench.status import (
    compute_status,
    fold_new_uploads,
    keep_recent_yield,
    read_people,
    recent_yield,
    record_changes,
    status_csv_path,
    sums_from_cache,
)
from workbench.studies import get_study, list_studies
from workbench.writers import write_csv_atomically


@dataclass
class RefreshReport:
    """What one :func:`refresh_status` did."""

    folded: int = 0
    studies: list[str] = field(default_factory=list)
    changes: int = 0
    opened: int = 0
    closed: int = 0
    mailed: int = 0
    mail_error: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for a terminal or a log."""
        line = (
            f"folded {self.folded} new uploads; {len(self.studies)} studies; "
            f"{self.changes} status changes; alerts: {self.opened} opened, {self.closed} closed, "
            f"{self.mailed} mailed"
        )
        if self.mail_error:
            line += f" (mail failed: {self.mail_error}; retried at the next refresh)"
        return f"{line}; {self.seconds * 1000:.0f} ms"


def refresh_status(
    config: Config,
    *,
    catalog: Catalog | None = None,
    now: int | None = None,
    studies: list[str] | None = None,
    mail: bool = True,
) -> RefreshReport:
    """Fold new uploads, recompute every active study's status (or those in ``studies``),
    record status changes, open and close alerts, write the status CSVs, mail new alerts.

    Example: ``refresh_status(load_config("demo-home")).summary()``.
    """
    started = time.perf_counter()
    with borrowed_catalog(config, catalog) as catalog:
        report = RefreshReport()
        folded = fold_new_uploads(catalog)
        report.folded = folded.rows
        now = now_ms() if now is None else now
        chosen = (
            [get_study(catalog, s) for s in studies]
            if studies
            else [s for s in list_studies(catalog) if s.active]
        )
        pool = DataPool.of(config)
        for study in chosen:
            sums = sums_from_cache(catalog, study.id, folded, pool.cache / "status")
            with catalog.engine.connect() as conn:
                people, phones = read_people(conn, study.id)
            # once per study and refresh, from the sensor tables; None if never built
            yields = recent_yield(config, catalog, study, now=now)
            keep_recent_yield(pool, study.id, yields)
            table = compute_status(study, people, phones, sums, now=now, yields=yields)
            report.changes += record_changes(catalog, study.id, table, now=now)
            opened, closed = update_alerts(catalog, study, table, now=now, yields=yields)
            report.opened += opened
            report.closed += closed
            # rewritten at every refresh: atomic for readers, not worth an fsync
            write_csv_atomically(table, status_csv_path(pool, study.id), durable=False)
            report.studies.append(study.id)
        if mail and config.smtp is not None:
            try:
                report.mailed = mail_new_alerts(catalog, config.smtp, now=now)
            except MailError as exc:
                report.mail_error = str(exc)
        report.seconds = time.perf_counter() - started
        return report
