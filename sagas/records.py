"""The writes every transition makes to the record (the database), as plain SQL.

They are the statements the ORM would send (values go through each field's own
`get_db_prep_save`, so JSON, UUIDs, decimals and times are stored exactly as the ORM stores them
on either database), without its per-statement query building, which was a third of the saga
consumer's CPU. On PostgreSQL, `pipeline()` sends a transition's statements together (psycopg's
pipeline mode) instead of waiting for each answer in turn. Reads, the admin and everything off
the hot path keep using the ORM.
"""
from contextlib import contextmanager, nullcontext

from django.db import connection
from django.db.models import Model


def _quote(name: str) -> str:
    return connection.ops.quote_name(name)


@contextmanager
def pipeline():
    """Statements inside go out without waiting for each other's answers (PostgreSQL; elsewhere
    a no-op). Read an `update`'s rowcount after leaving the block; an error surfaces by then."""
    connection.ensure_connection()
    # an error may surface as the block ends, outside any cursor call: make it Django's error too
    with connection.wrap_database_errors, getattr(connection.connection, "pipeline", nullcontext)():
        yield


def insert(objs: list[Model]) -> list[Model]:
    """INSERT the objects (all of one model) in one statement; auto ids are set on them."""
    if not objs:
        return objs
    meta = objs[0]._meta
    auto_pk = meta.auto_field is not None
    fields = [f for f in meta.concrete_fields if not (auto_pk and f.primary_key)]
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    sql = (f"INSERT INTO {_quote(meta.db_table)} ({', '.join(_quote(f.column) for f in fields)}) "
           f"VALUES {', '.join([row] * len(objs))}")
    params = [f.get_db_prep_save(f.pre_save(obj, True), connection) for obj in objs for f in fields]
    cursor = connection.cursor()
    if not auto_pk:
        cursor.execute(sql, params)
        return objs
    cursor.execute(f"{sql} RETURNING {_quote(meta.pk.column)}", params)
    for obj, (pk,) in zip(objs, cursor.fetchall()):
        obj.pk = pk
    return objs


def update(model: type[Model], where: dict, values: dict):
    """UPDATE the rows matching `where` (field = value, and-ed); its `.rowcount` is the number of
    rows changed (inside `pipeline()`, known once the block is left)."""
    return update_many(model, list(where), list(values), [[*where.values(), *values.values()]])


def update_many(model: type[Model], where: list[str], columns: list[str], rows: list[list]):
    """One UPDATE per row: each row holds the `where` values, then the new `columns` values."""
    meta = model._meta
    key_fields = [meta.pk if name == "pk" else meta.get_field(name) for name in where]
    set_fields = [meta.get_field(name) for name in columns]
    sql = (f"UPDATE {_quote(meta.db_table)} SET {', '.join(f'{_quote(f.column)} = %s' for f in set_fields)} "
           f"WHERE {' AND '.join(f'{_quote(f.column)} = %s' for f in key_fields)}")
    params = [
        [f.get_db_prep_save(v, connection) for f, v in zip(set_fields, row[len(where):])]
        + [f.get_db_prep_save(v, connection) for f, v in zip(key_fields, row)]
        for row in rows
    ]
    # Cursors are left open: inside a pipeline their results arrive after this returns.
    cursor = connection.cursor()
    if len(params) == 1:
        cursor.execute(sql, params[0])
    else:
        cursor.executemany(sql, params)
    return cursor
