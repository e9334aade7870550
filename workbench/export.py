"""Questionnaire export: empty study servers into the pool, decrypted and decoded.

A source (``[[sources]]`` in workbench.toml) speaks the MindTrails export protocol: ``GET
/export/`` lists tables, ``GET /export/{name}?greaterThan={id}`` returns rows after an id,
``DELETE /export/{name}/{id}`` deletes one row. For each table, an export does, each step
durable before the next:

1. fetch the rows above the table's high-water mark (rows at or below it are dropped here too,
   for servers that ignore ``greaterThan``);
2. write them as a raw snapshot, ``questionnaires/<source>/raw/<table>/<table>_<time>_<hash>.json``,
   never overwriting, and record its SHA-256 in the catalog (``export_raw``);
3. decrypt the fields whose names end in ``RSA`` and merge the rows into per-date Parquet files
   (and ``<table>_<date>.csv``) under ``questionnaires/<source>/decoded/<table>/``,
   de-duplicated by row id;
4. advance the high-water mark, never past ids the server has not used yet: the mark moves
   to the highest stored id reached in steps of at most ``max_id_jump`` (a row far ahead of
   the rest, such as a hand-made id of 10^15, is stored but waits above the mark, and the rows
   that come after the others are still fetched; see :func:`reachable_mark`);
5. in ``delete_mode`` only, delete on the server each row found both in the raw snapshot (hash
   checked) and in the decoded files.

Between 3 and marking the snapshot decoded, the decoded rows of tables the source maps to an
instrument with safety items are checked (:mod:`workbench.safety`): a positive or missing
safety item opens one safety alert per participant and session, and at the end of the run the
new ones are mailed at once to the source's safety contacts. A crash before the check leaves
the snapshot undecoded, so the next run checks it; an alert is never opened twice.

A table whose answer holds ids outside signed 64-bit integers, or is larger than
``max_answer_mb``, is refused with a clear error (:class:`TableRefused`) before anything of it is
stored; the other tables and sources go on. Every file and folder name comes from a name checked
against its pattern and resolved inside its folder
(:func:`workbench.decoded.table_folder`).

A crash at any point loses nothing: the next run first finishes what an earlier one left
(snapshots not yet decoded, deletes not yet done) and then fetches again from the mark, so it
converges. :func:`rebuild_decoded` makes every decoded table again from the raw snapshots alone,
and gives what the incremental path gave.

Example::

    report = export_sources(load_config("demo-home"))
    print(report.summary())

The decoded tables are read through :mod:`workbench.decoded` (``combine_table``).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx
import orjson
import polars as pl
from sqlalchemy import select, update
from tqdm import tqdm

from workbench.catalog import (
    Catalog,
    borrowed_catalog,
    dialect_insert,
    export_deletions,
    export_marks,
    export_raw,
)
from workbench.config import Config, SourceConfig
from workbench.decoded import (
    TABLE_NAME,
    check_name,
    day_column,
    decoded_ids,
    merge_decoded,
    source_folder,
    table_folder,
)
from workbench.errors import (
    ConfigError,
    SourceUnavailable,
    TableRefused,
    WorkbenchError,
)
from workbench.pool import (
    DataPool,
    make_folders,
    open_new_file,
)
from workbench.safety import check_new_rows, mail_pending, source_instruments
from workbench.times import STAMP, format_ms, now_ms

log = logging.getLogger("workbench.export")

INT64 = (-(2**63), 2**63 - 1)  # the row ids the catalog and the decoded files can hold
ENCRYPTED_SUFFIX = "RSA"
PARALLEL_FROM = 2000  # values; fewer are decrypted in this process
# A string this long of base64 characters left in a decoded table is ciphertext until proven
# otherwise (RSA-2048 gives 344 characters).
CIPHERTEXT = r"^[A-Za-z0-9+/]{160,}={0,2}$"


# ---------------------------------------------------------------------------- reports


@dataclass
class TableExport:
    """What an export did for one table."""

    table: str
    new_rows: int = 0
    raw: str | None = None
    undecryptable: int = 0
    deleted: int = 0
    left_on_server: int = 0
    ahead: int = 0  # stored rows far above the others, which the mark does not pass yet
    safety_alerts: int = 0  # safety alerts the new rows opened
    error: str | None = None


@dataclass
class ExportReport:
    """What :func:`export_source` did."""

    source: str
    tables: list[TableExport] = field(default_factory=list)
    resumed: int = 0  # raw snapshots an earlier, interrupted run left to decode
    safety_alerts: int = 0  # opened by rows an interrupted run left (the tables count theirs)
    safety_mailed: int = 0
    seconds: float = 0.0
    error: str | None = None  # the source could not be exported at all

    @property
    def ok(self) -> bool:
        return self.error is None and not any(t.error for t in self.tables)

    def summary(self) -> str:
        if self.error:
            return f"{self.source}: not exported: {self.error}"
        rows = sum(t.new_rows for t in self.tables)
        parts = [f"{self.source}: {rows} new rows from {len(self.tables)} tables"]
        if self.resumed:
            parts.append(f"{self.resumed} interrupted snapshots finished")
        deleted = sum(t.deleted for t in self.tables)
        if deleted:
            parts.append(f"{deleted} rows deleted on the server")
        ahead = sum(t.ahead for t in self.tables)
        if ahead:
            parts.append(f"{ahead} stored rows far ahead of the others (the mark waits below)")
        safety = self.safety_alerts + sum(t.safety_alerts for t in self.tables)
        if safety:
            parts.append(
                f"{safety} safety alert(s) opened, {self.safety_mailed} mailed "
                "(see `workbench alerts`)"
            )
        bad = sum(t.undecryptable for t in self.tables)
        if bad:
            parts.append(f"{bad} values could not be decrypted (flagged, see critical.log)")
        failed = [f"{t.table}: {t.error}" for t in self.tables if t.error]
        if failed:
            parts.append("failed: " + "; ".join(failed))
        return f"{', '.join(parts)} ({self.seconds:.1f} s)"


# ---------------------------------------------------------------------------- client


class ExportClient:
    """The export protocol over HTTP, with timeouts and retries with doubling backoff.

    Example: ``ExportClient(config.source("mindtrails")).tables()``.
    """

    def __init__(self, source: SourceConfig, *, transport: httpx.BaseTransport | None = None):
        self.source = source
        user, password = source.credentials()
        self.http = httpx.Client(
            base_url=source.url.rstrip("/"),
            auth=(user, password),
            timeout=source.timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        delay = self.source.backoff
        for attempt in range(self.source.retries + 1):
            try:
                response = self._send(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, dropped, timed out
                problem = f"{type(exc).__name__}: {exc or 'no answer'}"
            else:
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
            log.warning(
                "%s %s%s failed (%s), attempt %d of %d",
                method,
                self.source.url,
                path,
                problem,
                attempt + 1,
                self.source.retries + 1,
            )
            if attempt < self.source.retries:
                time.sleep(delay)
                delay *= 2
        raise SourceUnavailable(
            f"source {self.source.name!r} at {self.source.url}: {method} {path} failed "
            f"{self.source.retries + 1} times, last with {problem}"
        )

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request whose body is read in pieces and refused past ``max_answer_mb``, so
        an answer never takes more memory than the limit allows (the refusal names it)."""
        limit = int(self.source.max_answer_mb * 1024 * 1024)
        request = self.http.build_request(method, path, **kwargs)
        response = self.http.send(request, stream=True)
        try:
            announced = response.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > limit:
                raise self._too_large(path, int(announced))
            body = bytearray()
            for piece in response.iter_bytes(1 << 16):
                body += piece
                if len(body) > limit:
                    raise self._too_large(path, len(body))
        finally:
            response.close()
        headers = [
            (k, v) for k, v in response.headers.multi_items() if k not in ("content-encoding",)
        ]  # the body is decoded already
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=request
        )

    def _too_large(self, path: str, size: int) -> TableRefused:
        return TableRefused(
            f"the answer to GET {path} is larger than max_answer_mb = "
            f"{self.source.max_answer_mb:g} MB (at least {size / 1024 / 1024:.2f} MB): raise "
            f"max_answer_mb for source {self.source.name!r} in workbench.toml if the machine "
            "has the memory (about seven times the answer while it is decoded)"
        )

    def _json(self, response: httpx.Response, what: str):
        if response.status_code == 401:
            raise SourceUnavailable(
                f"source {self.source.name!r} refused the credentials from "
                f"{self.source.user_env}/{self.source.password_env} (401)"
            )
        if response.status_code != 200:
            raise SourceUnavailable(
                f"source {self.source.name!r}: {what} answered {response.status_code}: "
                f"{response.text[:200]}"
            )
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise SourceUnavailable(
                f"source {self.source.name!r}: {what} is not JSON: {exc}"
            ) from None

    def tables(self) -> list[dict]:
        """The server's tables: ``[{"name", "size", "deleteable"}, ...]``."""
        listing = self._json(self._request("GET", "/export/"), "the table list")
        if not isinstance(listing, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in listing
        ):
            raise SourceUnavailable(f"source {self.source.name!r}: unexpected table list")
        return listing

    def rows(self, table: str, greater_than: int) -> list[dict]:
        """The rows of ``table`` with ids above ``greater_than`` (the server may send more)."""
        response = self._request("GET", f"/export/{table}", params={"greaterThan": greater_than})
        rows = self._json(response, f"table {table}")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SourceUnavailable(f"source {self.source.name!r}: table {table} is not a list")
        return rows

    def delete(self, table: str, row_id: int) -> bool:
        """Delete one row; True when deleted now or gone already (404)."""
        response = self._request("DELETE", f"/export/{table}/{row_id}")
        if response.status_code in (200, 204, 404):
            return True
        log.error(
            "source %s refused to delete %s/%s: %s %s",
            self.source.name,
            table,
            row_id,
            response.status_code,
            response.text[:200],
        )
        return False


# ---------------------------------------------------------------------------- decryption


def load_private_key(source: SourceConfig):
    """The source's private key (loaded once per export), or :class:`ConfigError`."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if source.private_key is None:
        raise ConfigError(f"source {source.name!r} has no private_key to decrypt with")
    try:
        pem = source.private_key.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"source {source.name!r}: cannot read {source.private_key}: {exc}"
        ) from exc
    try:
        return load_pem_private_key(pem, password=source.passphrase())
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"source {source.name!r}: cannot load the private key {source.private_key} "
            f"(wrong passphrase, or not a PEM private key): {exc}"
        ) from exc


def _padding(name: str):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    if name == "oaep":
        return padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
    return padding.PKCS1v15()


def decrypt_values(key, values: list[str | None], padding_name: str) -> list[str | None]:
    """Plaintexts of base64 RSA ciphertexts; None for a value that is missing or fails.

    With PKCS#1 v1.5, OpenSSL answers a wrong ciphertext with random bytes rather than an error
    (implicit rejection), so a plaintext must also be non-empty printable UTF-8 to count.
    """
    from cryptography.exceptions import InvalidKey

    scheme = _padding(padding_name)
    out: list[str | None] = []
    for value in values:
        if not isinstance(value, str) or not value:
            out.append(None)
            continue
        try:
            plain = key.decrypt(base64.b64decode(value, validate=True), scheme).decode("utf-8")
        except (ValueError, binascii.Error, InvalidKey, UnicodeDecodeError):
            out.append(None)
            continue
        out.append(plain if plain and plain.isprintable() else None)
    return out


def confirm_pkcs1v15(key, values: list[str | None], plain: list[str | None]) -> list[str | None]:
    """``plain`` with every value whose ciphertext does not carry valid PKCS#1 v1.5 padding
    around exactly that plaintext set to None.

    OpenSSL's implicit rejection answers a wrong ciphertext with bytes that may look like
    text; undoing the RSA step by hand shows whether the padding really was there. This is
    done only for stored data, offline, where a timing side channel reveals nothing.
    """
    numbers = key.private_numbers()
    p, q, n = numbers.p, numbers.q, numbers.public_numbers.n
    size = (n.bit_length() + 7) // 8
    out: list[str | None] = []
    for value, text in zip(values, plain, strict=True):
        if text is None:
            out.append(None)
            continue
        c = int.from_bytes(base64.b64decode(value, validate=True), "big")
        if c >= n:
            out.append(None)
            continue
        m1, m2 = pow(c, numbers.dmp1, p), pow(c, numbers.dmq1, q)
        m = m2 + (numbers.iqmp * (m1 - m2) % p) * q  # the Chinese remainder theorem
        block = m.to_bytes(size, "big")
        separator = block.find(b"\0", 2)
        valid = block[:2] == b"\0\2" and separator >= 10 and block[separator + 1 :] == text.encode()
        out.append(text if valid else None)
    return out


_worker_key = None
_worker_padding = "pkcs1v15"


def _start_worker(source: SourceConfig) -> None:
    global _worker_key, _worker_padding
    _worker_key, _worker_padding = load_private_key(source), source.padding


def _decrypt_chunk(values: list[str | None]) -> list[str | None]:
    return decrypt_values(_worker_key, values, _worker_padding)


class Decrypter:
    """Decrypts with a source's key, loaded once; large batches go to one process per core."""

    def __init__(self, source: SourceConfig, *, workers: int | None = None):
        self.source = source
        self.key = load_private_key(source)
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, values: list[str | None], *, progress: bool = False) -> list[str | None]:
        if len(values) < PARALLEL_FROM or self.workers == 1:
            return decrypt_values(self.key, values, self.source.padding)
        if self._pool is None:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_start_worker,
                initargs=(self.source,),
            )
        size = max(200, len(values) // (self.workers * 8))
        chunks = [values[i : i + size] for i in range(0, len(values), size)]
        out: list[str | None] = []
        with tqdm(total=len(values), unit="value", desc="decrypt", disable=not progress) as bar:
            for part in self._pool.map(_decrypt_chunk, chunks):
                out.extend(part)
                bar.update(len(part))
        return out

    def confirm(self, values: list[str | None], plain: list[str | None]) -> list[str | None]:
        """``plain`` with what is not truly a plaintext of ``values`` set to None (PKCS#1 v1.5
        only: OAEP never decrypts a wrong ciphertext)."""
        if self.source.padding != "pkcs1v15":
            return plain
        return confirm_pkcs1v15(self.key, values, plain)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# ---------------------------------------------------------------------------- decoding


def decode_rows(
    rows: list[dict],
    decrypt: Callable[[list], list],
    *,
    source: str,
    table: str,
    confirm: Callable[[list, list], list] | None = None,
) -> tuple[pl.DataFrame, int]:
    """A tidy table of ``rows``: each ``<name>RSA`` field decrypted into ``<name>`` (the
    ciphertext dropped) with a ``<name>_undecryptable`` flag, nested values as JSON text, and
    ``_date`` (the row's day, from its ``date``) for partitioning. Returns it and the number of
    values that could not be decrypted; those are logged as critical.

    Each value stands on its own: one that decrypts is kept whatever its neighbours do, one
    that fails is left empty and flagged. In a column where some fail, ``confirm`` (see
    :meth:`Decrypter.confirm`) checks the others, so that no noise passes for a plaintext.
    A flag never replaces a server column: if the server sends ``<name>_undecryptable`` too,
    the flag is ``<name>RSA_undecryptable`` (then with ``_2``, ``_3``, ... until free)."""
    if not rows:
        return pl.DataFrame(), 0
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    names = list(seen)
    taken = set(names)
    encrypted = [
        n for n in names if n.endswith(ENCRYPTED_SUFFIX) and len(n) > len(ENCRYPTED_SUFFIX)
    ]
    columns: dict[str, list] = {}
    failed = 0
    for name in names:
        values = [row.get(name) for row in rows]
        if name in encrypted:
            base = name[: -len(ENCRYPTED_SUFFIX)]
            target = _free_name([base, f"{name}_plain"], taken)
            flag = _free_name([f"{target}_undecryptable", f"{name}_undecryptable"], taken)
            present = sum(1 for v in values if v not in (None, ""))
            plain = decrypt(values)
            bad = sum(
                1 for v, p in zip(values, plain, strict=True) if v not in (None, "") and p is None
            )
            if bad and confirm is not None:
                # with failures about, a "plaintext" may be implicit-rejection noise: check
                plain = confirm(values, plain)
                bad = sum(
                    1
                    for v, p in zip(values, plain, strict=True)
                    if v not in (None, "") and p is None
                )
            if bad:
                failed += bad
                why = (
                    "none could be decrypted: wrong private key or padding?"
                    if bad == present
                    else "corrupt ciphertext?"
                )
                log.critical(
                    "%s/%s: %d of %d values of %s could not be decrypted and are left empty "
                    "with %s set (%s)",
                    source,
                    table,
                    bad,
                    present,
                    name,
                    flag,
                    why,
                )
            columns[target] = plain
            columns[flag] = [
                v not in (None, "") and p is None for v, p in zip(values, plain, strict=True)
            ]
        else:
            if any(isinstance(v, dict | list) for v in values):
                values = [
                    orjson.dumps(v).decode() if isinstance(v, dict | list) else v for v in values
                ]
            columns[name] = values
    frame = pl.DataFrame(columns, strict=False, infer_schema_length=None)
    frame = frame.with_columns(day_column(frame).alias("_date"))
    _warn_ciphertext(frame, source=source, table=table)
    return frame, failed


def _free_name(candidates: list[str], taken: set[str]) -> str:
    """The first candidate not taken (else the last with ``_2``, ``_3``, ...), now taken."""
    free = [c for c in candidates if c not in taken]
    name = free[0] if free else candidates[-1]
    n = 2
    while name in taken:
        name, n = f"{candidates[-1]}_{n}", n + 1
    taken.add(name)
    return name


def _warn_ciphertext(frame: pl.DataFrame, *, source: str, table: str) -> None:
    for name, dtype in frame.schema.items():
        if dtype == pl.String:
            found = frame.select(pl.col(name).str.contains(CIPHERTEXT).sum()).item()
            if found:
                log.critical(
                    "%s/%s: %d values of column %s look like ciphertext after decoding",
                    source,
                    table,
                    found,
                    name,
                )


# ---------------------------------------------------------------------------- the export


def export_sources(
    config: Config,
    source: str | None = None,
    table: str | None = None,
    *,
    progress: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> list[ExportReport]:
    """Export every source (or one), every table (or one).

    Example: ``[r.summary() for r in export_sources(config)]``.
    """
    chosen = [config.source(check_name("source", source))] if source else list(config.sources)
    if not chosen:
        raise ConfigError("no [[sources]] in workbench.toml to export")
    if table is not None:
        check_name("table", table)
    reports = []
    for s in chosen:
        try:
            reports.append(
                export_source(
                    config,
                    s.name,
                    tables=[table] if table else None,
                    progress=progress,
                    transport=transport,
                )
            )
        except SourceUnavailable as exc:  # logged as critical; the other sources go on
            reports.append(ExportReport(source=s.name, error=exc.message))
    return reports


def export_source(
    config: Config,
    name: str,
    *,
    tables: list[str] | None = None,
    progress: bool = False,
    transport: httpx.BaseTransport | None = None,
    catalog: Catalog | None = None,
) -> ExportReport:
    """Export one source: finish what an interrupted run left, then fetch, store, decode,
    advance and (in delete mode) delete, table by table.

    Example: ``export_source(config, "mindtrails", tables=["PHQ9"]).summary()``.
    """
    source = config.source(name)
    source_instruments(
        source, config=config
    )  # an unknown instrument stops the export before anything
    started = time.perf_counter()
    report = ExportReport(source=name)
    with borrowed_catalog(config, catalog) as catalog:
        client: ExportClient | None = None
        decrypter: Decrypter | None = None
        lock: int | None = None
        try:
            lock = _source_lock(config, name)  # one export or rebuild of a source at a time
            client = ExportClient(source, transport=transport)
            decrypter = Decrypter(source)
            report.resumed, report.safety_alerts = _finish_interrupted(
                config, catalog, source, decrypter
            )
            listing = {t["name"]: t for t in client.tables()}
            names = [n for n in sorted(listing) if source.wants(n) and (not tables or n in tables)]
            for missing in sorted(set(tables or ()) - set(listing)):
                report.tables.append(TableExport(missing, error="no such table on the server"))
            for table in names:
                result = TableExport(table)
                report.tables.append(result)
                if not TABLE_NAME.fullmatch(table):
                    result.error = "the table name cannot be used as a file name"
                    log.error("%s: table %r skipped: %s", name, table, result.error)
                    continue
                try:
                    _export_table(
                        config, catalog, client, source, decrypter, listing[table], result, progress
                    )
                except WorkbenchError as exc:  # e.g. SourceUnavailable, TableRefused
                    result.error = exc.message
                    log.error("%s/%s: %s; progress so far is kept", name, table, exc.message)
        except SourceUnavailable as exc:
            log.critical("source %s is down: %s", name, exc.message)
            raise
        finally:
            if client is not None:
                client.close()
            if decrypter is not None:
                decrypter.close()
            if lock is not None:
                # safety alerts are mailed at once, even when the source failed part-way
                report.safety_mailed = mail_pending(config, catalog, source)
                os.close(lock)
    report.seconds = time.perf_counter() - started
    log.info("%s", report.summary())
    return report


def _export_table(config, catalog, client, source, decrypter, listed, result, progress) -> None:
    table = listed["name"]
    mark = high_water(catalog, source.name, table)
    rows = client.rows(table, mark)
    bad = [r for r in rows if not isinstance(r.get("id"), int) or isinstance(r.get("id"), bool)]
    if bad:
        raise SourceUnavailable(f"{len(bad)} rows without an integer id: cannot export by id")
    outside = [r["id"] for r in rows if not INT64[0] <= r["id"] <= INT64[1]]
    if outside:
        raise TableRefused(
            f"{len(outside)} rows have ids outside signed 64-bit integers (e.g. {outside[0]}): "
            "nothing of this table is stored until they are corrected on the server"
        )
    ahead = stored_above(config, catalog, source.name, table, mark)
    new = sorted((r for r in rows if r["id"] > mark and r["id"] not in ahead), key=_row_id)
    result.new_rows = len(new)
    if new:
        raw_id, relative = write_raw(config, catalog, source.name, table, new, mark)
        result.raw = relative
        result.undecryptable, result.safety_alerts = _decode_raw(
            config, catalog, source, decrypter, raw_id, progress
        )
    result.ahead = _settle_mark(catalog, source, table, mark, ahead | {r["id"] for r in new})
    if source.delete_mode and listed.get("deleteable"):
        result.deleted = _delete_verified(config, catalog, client, source, table)
        # Everything stored is deleted by now: a row at or below the mark still there is
        # sensitive data that escaped (a failed delete, a restored backup, ...).
        top = high_water(catalog, source.name, table)
        still = [
            r.get("id")
            for r in client.rows(table, 0)
            if isinstance(r.get("id"), int) and r["id"] <= top
        ]
        if still:
            result.left_on_server = len(still)
            log.critical(
                "%s/%s: sensitive data found on server: %d rows at or below the high-water "
                "mark %d are still there (ids %s)",
                source.name,
                table,
                len(still),
                top,
                ", ".join(map(str, still[:20])) + (" ..." if len(still) > 20 else ""),
            )


def _row_id(row: dict) -> int:
    return row["id"]


def reachable_mark(mark: int, stored: set[int], max_jump: int) -> int:
    """The highest stored id reached from ``mark`` in steps of at most ``max_jump``.

    The high-water mark moves to it: a stored row far ahead of the others (a hand-made id of
    10^15, say) does not move the mark past ids the server has not used yet, so later rows
    below it are still fetched; once the table's ids come within ``max_jump`` of it, the mark
    passes it as usual.

    Example: ``reachable_mark(100, {101, 102, 10**15}, 1_000_000)`` -> ``102``.
    """
    top = mark
    for row_id in sorted(i for i in stored if i > mark):
        if row_id - top > max_jump:
            break
        top = row_id
    return top


def stored_above(config: Config, catalog: Catalog, source: str, table: str, mark: int) -> set[int]:
    """Ids of ``table`` stored in raw snapshots above the mark (rows far ahead of the rest)."""
    r = export_raw.c
    with catalog.engine.connect() as conn:
        snapshots = conn.execute(
            select(export_raw).where(r.source == source, r.table_name == table, r.max_row > mark)
        ).all()
    return {row["id"] for s in snapshots for row in read_raw(config, s) if row["id"] > mark}


def _settle_mark(catalog: Catalog, source: SourceConfig, table: str, mark: int, stored) -> int:
    """Advance the table's mark as far as :func:`reachable_mark` allows; return how many stored
    rows stay above it (logged)."""
    top = reachable_mark(mark, stored, source.max_id_jump)
    if top > mark:
        _advance(catalog, source.name, table, top)
    beyond = sorted(i for i in stored if i > top)
    if beyond:
        log.warning(
            "%s/%s: %d stored rows have ids more than max_id_jump = %d above the others "
            "(from %d); the mark stays at %d so that later rows are still fetched",
            source.name,
            table,
            len(beyond),
            source.max_id_jump,
            beyond[0],
            top,
        )
    return len(beyond)


def _source_lock(config: Config, source: str) -> int:
    """Take the source's lock (an exclusive flock, waiting for a running export or rebuild);
    return its descriptor, to be closed when done."""
    folder = source_folder(config, source)
    make_folders(folder)
    fd = open_new_file(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def high_water(catalog: Catalog, source: str, table: str) -> int:
    """The largest row id of ``table`` already stored and decoded (0 if none)."""
    m = export_marks.c
    with catalog.engine.connect() as conn:
        value = conn.execute(
            select(m.high_water).where(m.source == source, m.table_name == table)
        ).scalar()
    return value or 0


def _advance(catalog: Catalog, source: str, table: str, top: int) -> None:
    now = now_ms()
    with catalog.writing() as conn:
        conn.execute(
            dialect_insert(catalog.engine, export_marks)
            .values(source=source, table_name=table, high_water=top, updated_at=now)
            .on_conflict_do_update(
                index_elements=["source", "table_name"],
                set_={"high_water": top, "updated_at": now},
                where=export_marks.c.high_water < top,  # a mark only ever rises
            )
        )


def write_raw(
    config: Config, catalog: Catalog, source: str, table: str, rows: list[dict], mark: int
) -> tuple[int, str]:
    """Store fetched rows as an immutable snapshot and record it; return (raw id, path)."""
    fetched = now_ms()
    body = orjson.dumps(
        {
            "source": source,
            "table": table,
            "fetched_at": fetched,
            "greater_than": mark,
            "rows": rows,
        },
        option=orjson.OPT_NON_STR_KEYS,
    )
    sha = hashlib.sha256(body).hexdigest()
    stamp = format_ms(fetched, STAMP)
    pool = DataPool.of(config)
    folder = table_folder(config, source, table, "raw")
    relative = pool.store(body, pool.relative(folder / f"{table}_{stamp}_{sha[:12]}.json"))
    with catalog.writing() as conn:
        raw_id = conn.execute(
            export_raw.insert()
            .values(
                source=source,
                table_name=table,
                fetched_at=fetched,
                path=relative,
                sha256=sha,
                bytes=len(body),
                n_rows=len(rows),
                min_row=rows[0]["id"],
                max_row=rows[-1]["id"],
            )
            .returning(export_raw.c.id)
        ).scalar_one()
    log.info("%s/%s: %d rows stored raw in %s", source, table, len(rows), relative)
    return raw_id, relative


def read_raw(config: Config, row) -> list[dict]:
    """The rows of a recorded raw snapshot, after checking its SHA-256."""
    body = DataPool.of(config).path(row.path).read_bytes()
    if hashlib.sha256(body).hexdigest() != row.sha256:
        raise WorkbenchError(f"raw snapshot {row.path} no longer matches its recorded SHA-256")
    return orjson.loads(body)["rows"]


def _decode_raw(config, catalog, source, decrypter, raw_id: int, progress: bool) -> tuple[int, int]:
    """Decode one raw snapshot into the decoded files, check its safety items and mark it
    decoded; return (values that could not be decrypted, safety alerts opened)."""
    with catalog.engine.connect() as conn:
        row = conn.execute(select(export_raw).where(export_raw.c.id == raw_id)).one()
    rows = read_raw(config, row)
    frame, failed = decode_rows(
        rows,
        lambda values: decrypter(values, progress=progress),
        source=source.name,
        table=row.table_name,
        confirm=decrypter.confirm,
    )
    folder = table_folder(config, source.name, row.table_name, "decoded")
    merge_decoded(folder, row.table_name, frame)
    opened = check_new_rows(catalog, source, row.table_name, frame, config=config)
    with catalog.writing() as conn:
        conn.execute(
            update(export_raw).where(export_raw.c.id == raw_id).values(decoded_at=now_ms())
        )
    return failed, len(opened)


def _finish_interrupted(config, catalog, source, decrypter) -> tuple[int, int]:
    """Record the snapshots an interrupted run wrote but did not record, decode those it did
    not decode, and advance their tables' marks; return how many, and the safety alerts
    their rows opened."""
    _adopt_unrecorded(config, catalog, source.name)
    r = export_raw.c
    with catalog.engine.connect() as conn:
        pending = conn.execute(
            select(r.id, r.table_name, r.max_row)
            .where(r.source == source.name, r.decoded_at.is_(None))
            .order_by(r.id)
        ).all()
    opened = 0
    for item in pending:
        log.warning(
            "%s/%s: finishing raw snapshot %d left by an interrupted run",
            source.name,
            item.table_name,
            item.id,
        )
        opened += _decode_raw(config, catalog, source, decrypter, item.id, False)[1]
    for table in sorted({item.table_name for item in pending}):
        mark = high_water(catalog, source.name, table)
        _settle_mark(
            catalog, source, table, mark, stored_above(config, catalog, source.name, table, mark)
        )
    return len(pending), opened


def _adopt_unrecorded(config: Config, catalog: Catalog, source: str) -> None:
    """Under the source's lock, a raw file without its catalog row was written by a run that
    stopped before recording it: record it (to be decoded), and remove unlinked temporaries
    (their rows are still on the server, above the mark)."""
    raw = source_folder(config, source) / "raw"
    if not raw.is_dir():
        return
    with catalog.engine.connect() as conn:
        known = set(
            conn.execute(select(export_raw.c.path).where(export_raw.c.source == source)).scalars()
        )
    for path in sorted(raw.glob("*/*")):
        relative = DataPool.of(config).relative(path)
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            log.warning("%s: removing %s, left by an interrupted run", source, relative)
            path.unlink()
            continue
        if relative in known or path.suffix != ".json":
            continue
        body = path.read_bytes()
        snapshot = orjson.loads(body)
        rows = snapshot["rows"]
        log.warning("%s: recording raw snapshot %s, left by an interrupted run", source, relative)
        with catalog.writing() as conn:
            conn.execute(
                export_raw.insert().values(
                    source=source,
                    table_name=path.parent.name,
                    fetched_at=snapshot["fetched_at"],
                    path=relative,
                    sha256=hashlib.sha256(body).hexdigest(),
                    bytes=len(body),
                    n_rows=len(rows),
                    min_row=rows[0]["id"],
                    max_row=rows[-1]["id"],
                )
            )


def _delete_verified(config, catalog, client, source, table) -> int:
    """Delete on the server the rows of decoded, not yet deleted snapshots of ``table``, each
    only if it is in its raw snapshot (hash checked) and in the decoded files."""
    r = export_raw.c
    with catalog.engine.connect() as conn:
        pending = conn.execute(
            select(export_raw)
            .where(
                r.source == source.name,
                r.table_name == table,
                r.decoded_at.is_not(None),
                r.deleted_at.is_(None),
            )
            .order_by(r.id)
        ).all()
    if not pending:
        return 0
    decoded = decoded_ids(config, source.name, table)
    deleted = 0
    for snapshot in pending:
        ids = [row["id"] for row in read_raw(config, snapshot)]
        complete = True
        withheld = [row_id for row_id in ids if row_id not in decoded]
        if withheld:
            complete = False
            log.critical(
                "%s/%s: %d rows of raw snapshot %s are not in the decoded files and are not "
                "deleted on the server (ids %s)",
                source.name,
                table,
                len(withheld),
                snapshot.path,
                ", ".join(map(str, withheld[:20])) + (" ..." if len(withheld) > 20 else ""),
            )
        for row_id in ids:
            if row_id not in decoded:
                continue
            if not client.delete(table, row_id):
                log.critical(
                    "%s/%s: could not delete row %s on the server", source.name, table, row_id
                )
                complete = False
                continue
            deleted += 1
            with catalog.writing(durable=False) as conn:
                conn.execute(
                    dialect_insert(catalog.engine, export_deletions)
                    .values(
                        source=source.name,
                        table_name=table,
                        row_id=row_id,
                        raw_id=snapshot.id,
                        deleted_at=now_ms(),
                    )
                    .on_conflict_do_nothing()
                )
        if complete:
            with catalog.writing() as conn:
                conn.execute(
                    update(export_raw).where(r.id == snapshot.id).values(deleted_at=now_ms())
                )
    log.info("%s/%s: %d rows deleted on the server", source.name, table, deleted)
    return deleted


# ---------------------------------------------------------------------------- rebuild, combine


def rebuild_decoded(
    config: Config,
    source: str | None = None,
    table: str | None = None,
    *,
    progress: bool = False,
    catalog: Catalog | None = None,
) -> dict[str, int]:
    """Make decoded tables again from the raw snapshots alone (every source and table, or
    one); return the rows decoded per ``source/table``.

    Example: ``rebuild_decoded(config)`` after losing the decoded folder.
    """
    chosen = [config.source(check_name("source", source))] if source else list(config.sources)
    if table is not None:
        check_name("table", table)  # before anything is deleted
    done: dict[str, int] = {}
    with borrowed_catalog(config, catalog) as catalog:
        for src in chosen:
            r = export_raw.c
            query = select(export_raw).where(r.source == src.name).order_by(r.id)
            if table:
                query = query.where(r.table_name == table)
            source_instruments(src, config=config)
            decrypter = Decrypter(src)  # the key first: nothing is deleted if it cannot load
            lock = _source_lock(config, src.name)
            try:
                with catalog.engine.connect() as conn:
                    snapshots = conn.execute(query).all()
                tables = sorted({s.table_name for s in snapshots} | ({table} if table else set()))
                folders = [table_folder(config, src.name, name, "decoded") for name in tables]
                for folder in folders:  # every name checked before the first is deleted
                    if folder.exists():
                        shutil.rmtree(folder)
                for snapshot in tqdm(
                    snapshots, unit="snapshot", desc=f"decode {src.name}", disable=not progress
                ):
                    rows = read_raw(config, snapshot)
                    frame, _failed = decode_rows(
                        rows,
                        decrypter,
                        source=src.name,
                        table=snapshot.table_name,
                        confirm=decrypter.confirm,
                    )
                    merge_decoded(
                        table_folder(config, src.name, snapshot.table_name, "decoded"),
                        snapshot.table_name,
                        frame,
                    )
                    # opens only what was never opened: acknowledged alerts stay closed
                    check_new_rows(catalog, src, snapshot.table_name, frame, config=config)
                    key = f"{src.name}/{snapshot.table_name}"
                    done[key] = done.get(key, 0) + len(rows)
            finally:
                mail_pending(config, catalog, src)
                os.close(lock)
                decrypter.close()
    return done
