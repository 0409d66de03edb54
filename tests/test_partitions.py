"""The partition layout of runbell.bus.keys: every key of a run in one slot with its partition's stream
and shard channel, partitions spread evenly over the slots, the same partition in every process."""

from __future__ import annotations

import zlib

import pytest
from redis.crc import key_slot as redis_key_slot

from runbell.bus import keys


@pytest.mark.parametrize("count", [1, 3, 16, 1024])
def test_partition_p_lands_in_the_p_th_of_n_equal_slot_ranges(count):
    tags = keys.partition_tags("runbell", count)
    assert len(set(tags)) == count
    for p, tag in enumerate(tags):
        assert p * 16384 // count <= keys.key_slot(tag) < (p + 1) * 16384 // count + 1
        assert keys.key_slot(tag) * count // 16384 == p


def test_the_slot_is_redis_clusters():
    for key in ("{runbell:p3.63}:x", "plain", "a{}b", "{}{x}", "ümlaut{tag}", ""):
        assert keys.key_slot(key) == redis_key_slot(key.encode())


@pytest.mark.parametrize(("dag_id", "run_id"), [("etl", "r1"), ("a/b", "{x}"), ("ü", "manual__2026-01-01T00:00:00+00:00")])
def test_a_runs_keys_share_the_slot_of_its_partitions_stream_and_channel(dag_id, run_id):
    k = keys.run_keys("ns", dag_id, run_id)
    assert len({keys.key_slot(key) for key in (k.seq, k.log, k.ids, k.epoch, k.stream, k.live)}) == 1
    assert k.seq.count("{") == 1  # ids are encoded: no second hash tag
    assert "\n" not in k.route


def test_a_runs_partition_is_a_crc32_so_every_process_agrees():
    # Pinned: a hook and a gateway of different versions (or Python hash seeds) must agree.
    assert keys.run_partition("etl", "r1") == zlib.crc32(b"run:etl/r1") % 16 == 2
    assert keys.run_partition("etl", "r1", 1) == 0
    assert keys.run_keys("runbell", "etl", "r1", 4).stream == keys.partition_stream("runbell", 4, keys.run_partition("etl", "r1", 4))


def test_the_partition_count_is_bounded():
    for bad in (0, -1, 1025):
        with pytest.raises(ValueError, match="1 to 1024"):
            keys.partitions(bad)
    assert keys.partitions(1024) == 1024
