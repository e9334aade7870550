"""Send mail through the SMTP server named in ``[smtp]`` of workbench.toml."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Sequence
from email.message import EmailMessage

from workbench.config import SmtpConfig
from workbench.errors import MailError


def send_mail(
    smtp: SmtpConfig, subject: str, body: str, *, to: Sequence[str] | None = None
) -> None:
    """Send one plain-text message to ``to`` (default: the configured recipients), or raise
    :class:`MailError`.

    Example: ``send_mail(config.smtp, "[workbench] test", "It works.")``.
    """
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(to or smtp.recipients)
    message["Subject"] = subject
    message.set_content(body)
    try:
        if smtp.ssl:  # a verified TLS connection from the start
            server = smtplib.SMTP_SSL(
                smtp.host, smtp.port, timeout=smtp.timeout, context=ssl.create_default_context()
            )
        else:
            server = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
        with server:
            if smtp.starttls and not smtp.ssl:
                server.starttls(context=ssl.create_default_context())
            if smtp.username:
                server.login(smtp.username, smtp.password or "")
            server.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(f"cannot mail through {smtp.host}:{smtp.port}: {exc}") from exc
