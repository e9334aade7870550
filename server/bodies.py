"""Request bodies, read no further than a limit: the upload routes' and the tracking API's.

A body announced larger than the limit is refused (413, :class:`BodyTooLarge`) before a byte of
it is read; a chunked one is refused as soon as it grows past the limit. A request with neither
a ``Content-Length`` nor chunked encoding has no body: the reader never waits on the socket.
What is malformed (a ``Content-Length`` that is not a whole number, a body shorter than it, JSON
that is not an object) raises the caller's own error type.
"""

from __future__ import annotations

from workbench.errors import BadRequest, BodyTooLarge, WorkbenchError
from workbench.json_limits import decode_checked

CHUNK = 64 * 1024


def read_body(
    environ: dict,
    *,
    limit: int,
    invalid: type[WorkbenchError] = BadRequest,
    owner: str = "server",
) -> bytes:
    """The request body of a WSGI ``environ``, refusing (413) anything over ``limit`` bytes.

    ``invalid`` is raised for malformed framing; ``owner`` names whose limit it is in the
    message. Example: ``read_body(request.environ, limit=1 << 20)``.
    """
    stream = environ["wsgi.input"]
    length_header = environ.get("CONTENT_LENGTH", "")
    if length_header:
        try:
            length = int(length_header)
        except ValueError:
            raise invalid("Content-Length is not a number") from None
        if length < 0:
            raise invalid("Content-Length is negative")
        if length > limit:
            raise BodyTooLarge(f"body of {length} bytes is over the {owner}'s limit of {limit}")
        body = stream.read(length) if length else b""
        if len(body) != length:
            raise invalid("the body ended before Content-Length bytes")
        return body
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    parts, size = [], 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over the {owner}'s limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def read_json_object(
    environ: dict,
    *,
    limit: int,
    invalid: type[WorkbenchError] = BadRequest,
    owner: str = "server",
) -> dict:
    """The request body as a JSON object (within the JSON depth and number limits), read as
    :func:`read_body` reads it.

    Example: ``read_json_object(request.environ, limit=MAX_BODY, invalid=InvalidJobRequest)``.
    """
    body = decode_checked(
        read_body(environ, limit=limit, invalid=invalid, owner=owner), error=invalid
    )
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body
