"""A corpus part reaches its final name only complete: a writer that dies part-way leaves no file a rerun would
take as done (the rerun skips parts that exist)."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from moca_fast.corpus import part_path, write_part


def test_a_part_whose_write_fails_midway_is_not_on_disk(tmp_path, monkeypatch):
    path = part_path(tmp_path, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    real = pq.write_table

    def dies_midway(table, where, **kwargs):
        real(table, where, **kwargs)
        with open(where, "r+b") as stream:
            stream.truncate(20)  # as if killed while writing
        raise OSError("killed")

    monkeypatch.setattr(pq, "write_table", dies_midway)
    with pytest.raises(OSError, match="killed"):
        write_part(path, range(3), ["a", "b", "c"], np.ones((3, 4), dtype=np.float32))
    assert not path.exists()

    monkeypatch.setattr(pq, "write_table", real)
    write_part(path, range(3), ["a", "b", "c"], np.ones((3, 4), dtype=np.float32))
    assert pq.read_table(path).num_rows == 3
