"""Tiered logging into the pool's ``logs/`` folder.

Four files, each rotated at midnight (UTC) with 366 old ones kept:

    debug.log     everything
    daily.log     info and above
    error.log     warnings and above
    critical.log  critical events only (a failed write or delete, a source down, sensitive
                  data left on a server, values that cannot be decrypted)

Critical events are also mailed to ``[smtp] recipients`` when SMTP is configured; a mail that
cannot be sent is noted in error.log and never stops the work that logged it.

Example::

    log = setup_logging(load_config("demo-home"))
    log.getChild("export").critical("cannot decrypt table PHQ9")
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from workbench.config import Config, SmtpConfig
from workbench.pool import DataPool, make_folders, open_new_file

LOGGER = "workbench"
FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
TIERS = {
    "debug.log": logging.DEBUG,
    "daily.log": logging.INFO,
    "error.log": logging.WARNING,
    "critical.log": logging.CRITICAL,
}
KEEP = 366


class _PrivateFileHandler(logging.handlers.TimedRotatingFileHandler):
    """Rotating log file created, and re-created at each rotation, with the pool's file mode."""

    def _open(self):
        return open(
            self.baseFilename,
            self.mode,
            encoding=self.encoding,
            errors=self.errors,
            opener=lambda path, flags: open_new_file(Path(path), flags),
        )


class _MailCritical(logging.Handler):
    """Mails each critical record; failures go to the other handlers, never raise."""

    def __init__(self, smtp: SmtpConfig) -> None:
        super().__init__(logging.CRITICAL)
        self.smtp = smtp

    def emit(self, record: logging.LogRecord) -> None:
        from workbench.errors import MailError
        from workbench.mail import send_mail

        try:
            send_mail(
                self.smtp,
                f"[workbench] critical: {record.getMessage()[:120]}",
                self.format(record) + "\n",
            )
        except MailError as exc:
            logging.getLogger(LOGGER).error("could not mail a critical event: %s", exc)


def setup_logging(config: Config, *, folder: Path | None = None) -> logging.Logger:
    """Attach the tiered files (in ``pool/logs`` unless ``folder``) and, with SMTP configured,
    mail for critical events, to the ``workbench`` logger; return it. Calling it again for the
    same folder changes nothing."""
    folder = folder or DataPool.of(config).logs
    make_folders(folder)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG)
    tag = str(folder.resolve())
    if any(getattr(h, "_workbench_folder", None) == tag for h in logger.handlers):
        return logger
    formatter = logging.Formatter(FORMAT)
    for name, level in TIERS.items():
        handler = _PrivateFileHandler(
            folder / name, when="midnight", backupCount=KEEP, utc=True, encoding="utf-8"
        )
        handler.setLevel(level)
        if level == logging.CRITICAL:
            handler.addFilter(lambda record: record.levelno >= logging.CRITICAL)
        handler.setFormatter(formatter)
        handler._workbench_folder = tag
        logger.addHandler(handler)
    if config.smtp is not None:
        mailer = _MailCritical(config.smtp)
        mailer.setFormatter(formatter)
        mailer._workbench_folder = tag
        logger.addHandler(mailer)
    return logger


def close_logging() -> None:
    """Detach and close the handlers :func:`setup_logging` attached."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "_workbench_folder", None) is not None:
            logger.removeHandler(handler)
            handler.close()
