"""The pool's raw-file store: every raw file enters durably, and none is ever overwritten."""

from __future__ import annotations

from workbench.ingest import recover_incoming
from workbench.ledger import verify
from workbench.pool import RAW_TAG, DataPool


def test_a_stored_raw_file_is_never_overwritten(home):
    pool = DataPool.of(home)
    pool.create()
    name = "sync/gh/raw/demo/demo_00001/steps/steps_2024-05-01.json"
    first = pool.store(b'{"window": 1}', name)
    second = pool.store(b'{"window": 2}', name)  # same name again: a new file beside it
    assert first == name
    assert second == name.replace(".json", "_1.json")
    assert pool.path(first).read_bytes() == b'{"window": 1}'
    assert pool.path(second).read_bytes() == b'{"window": 2}'
    assert pool.incoming_files() == []  # nothing left behind in the incoming folder


def test_recovery_discards_a_store_a_crash_interrupted(home):
    pool = DataPool.of(home)
    pool.create()
    pool.write_incoming(b'{"rows": []}', tag=RAW_TAG)  # what a kill before the link leaves
    assert [d.kind for d in verify(home, settle=0)] == ["temporary"]
    assert recover_incoming(home)["discarded"] == 1
    assert pool.incoming_files() == []
    assert verify(home, settle=0) == []
