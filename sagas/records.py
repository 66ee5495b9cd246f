"""The writes every transition makes to the record (the database), as plain SQL.

They are the statements the ORM would send (values go through each field's own
`get_db_prep_save`, so JSON, UUIDs, decimals and times are stored exactly as the ORM stores them
on either database), without its per-statement query building. On PostgreSQL they go through
psycopg's own cursor, binding values on the server: one statement text per table, run for each
row (`executemany`, which has PostgreSQL prepare it); and `pipeline()` sends a transition's
statements without waiting for each one's answer, except where ids are asked back (the outbox
rows, the compare-and-sets): those wait for theirs. (One statement per table with an array per
column, `INSERT ... SELECT FROM UNNEST`, as Django's bulk_create does, cost a third more client
CPU per transition here: psycopg adapts the arrays in Python.) Django's query log
(`connection.queries`, `CaptureQueriesContext`) still sees each statement.
Reads, the admin and everything off the hot path keep using the ORM.
"""
import time
from contextlib import contextmanager, nullcontext
from functools import cache

import psycopg
from django.db import connections
from django.db.models import Model

# the transition path writes on the default database
ALIAS = "default"


@contextmanager
def pipeline():
    """Statements inside go out without waiting for each other's answers (PostgreSQL; elsewhere
    a no-op). Read an `update`'s changed rows after leaving the block; an error surfaces by then."""
    connection = connections[ALIAS]
    connection.ensure_connection()
    # an error may surface as the block ends, outside any cursor call: make it Django's error too
    with connection.wrap_database_errors, getattr(connection.connection, "pipeline", nullcontext)():
        yield


def insert(objs: list[Model], *, with_ids: bool = True) -> list[Model]:
    """INSERT the objects (all of one model); auto ids are set on them, unless `with_ids` is False
    (then the statements need no answer before the pipeline's end)."""
    if not objs:
        return objs
    connection = connections[ALIAS]
    returning = with_ids and objs[0]._meta.auto_field is not None
    fields, sql = _insert_statement(type(objs[0]), connection.vendor, returning)
    rows = [[f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields] for obj in objs]
    keys = _run(connection, sql, rows, returning=returning)
    if keys is not None:
        for obj, pk in zip(objs, keys.rows()):
            obj.pk = pk
    return objs


def update(model: type[Model], where: list[str], columns: list[str], rows: list[list]) -> "Returned":
    """One UPDATE per row: each row holds the `where` values (field names; "pk" for the primary
    key), then the new `columns` values. Returns the primary keys of the rows changed (inside
    `pipeline()`, readable once the block is left)."""
    connection = connections[ALIAS]
    key_fields, set_fields, sql = _update_statement(model, tuple(where), tuple(columns), connection.vendor)
    params = [
        [f.get_db_prep_save(v, connection) for f, v in zip(set_fields, row[len(where):])]
        + [f.get_db_prep_save(v, connection) for f, v in zip(key_fields, row)]
        for row in rows
    ]
    return _run(connection, sql, params, returning=True)


@cache
def _insert_statement(model: type[Model], vendor: str, returning: bool) -> tuple[list, str]:
    meta, quote = model._meta, connections[ALIAS].ops.quote_name
    auto_pk = meta.auto_field is not None
    fields = [f for f in meta.concrete_fields if not (auto_pk and f.primary_key)]
    sql = (f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))})")
    return fields, f"{sql} RETURNING {quote(meta.pk.column)}" if returning else sql


@cache
def _update_statement(model: type[Model], where: tuple[str, ...], columns: tuple[str, ...], vendor: str):
    meta, quote = model._meta, connections[ALIAS].ops.quote_name
    key_fields = [meta.pk if name == "pk" else meta.get_field(name) for name in where]
    set_fields = [meta.get_field(name) for name in columns]
    sql = (f"UPDATE {quote(meta.db_table)} SET {', '.join(f'{quote(f.column)} = %s' for f in set_fields)} "
           f"WHERE {' AND '.join(f'{quote(f.column)} = %s' for f in key_fields)} RETURNING {quote(meta.pk.column)}")
    return key_fields, set_fields, sql


class Returned:
    """What the statements of one `_run` returned: the first column of each row."""

    def __init__(self, cursor=None, collected: list | None = None):
        self._cursor, self._collected = cursor, collected

    def rows(self) -> list:
        if self._collected is None:  # psycopg: one result set per statement run, ready once the pipeline synced
            found = []
            while True:
                found += [row[0] for row in self._cursor.fetchall()]
                if not self._cursor.nextset():
                    break
            self._collected = found
        return self._collected


def _run(connection, sql: str, rows: list[list], *, returning: bool) -> Returned | None:
    """Run `sql` once per row of parameters; with `returning`, what the statements returned."""
    if not rows:
        return Returned(collected=[]) if returning else None
    if connection.vendor != "postgresql":  # Django's cursor (which logs its queries itself)
        cursor, collected = connection.cursor(), []
        for row in rows:
            cursor.execute(sql, row)
            if returning:
                collected += [found[0] for found in cursor.fetchall()]
        return Returned(collected=collected) if returning else None
    started = time.monotonic()
    with connection.wrap_database_errors:
        # psycopg's cursor binds on the server (Django's own cursor, a ClientCursor, would not)
        cursor = psycopg.Cursor(connection.connection)
        cursor.executemany(sql, rows, returning=returning)
    if connection.queries_logged:  # as Django logs its own executemany
        connection.queries_log.append({"sql": f"{len(rows)} times: {sql}" if len(rows) > 1 else sql,
                                       "time": f"{time.monotonic() - started:.3f}"})
    return Returned(cursor) if returning else None
