"""The engine through the Python package, on host memory (numpy buffers): round trips,
dedup, prefetch, forwarding, the storage file, and the errors bad calls get."""

import json
import os
import threading

import numpy as np
import pytest

import spillway

SMALL = dict(
    device="host",
    staging_bytes="8MiB",
    prefetch_bytes="4MiB",
    pack_extent_bytes="1MiB",
    pack_threshold="256KiB",
    # One file per directory, whatever filesystem holds the test's temporary directory
    # (a tmpfs one would be spread over 8).
    spread_files=1,
)


def region(a):
    return [(a.ctypes.data, a.nbytes)]


def blob(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


@pytest.fixture
def engine(tmp_path):
    with spillway.Engine(tmp_path, capacity="256MiB", **SMALL) as e:
        yield e


def test_round_trip_of_mixed_sizes_through_storage(engine):
    sizes = [1, 100, 4096, 5000, 300_000, 3 << 20, 65_536]
    arrays = [blob(n, i) for i, n in enumerate(sizes)]
    handles = [engine.offload((i, 0), region(a)) for i, a in enumerate(arrays)]
    engine.wait_source_released(handles[-1])
    engine.drain()
    assert all(engine.source_released(h) for h in handles)
    for h, a in zip(handles, arrays):
        out = np.full_like(a, 0xAA)
        engine.fetch(h, region(out))
        np.testing.assert_array_equal(out, a)
    s = engine.stats()
    assert s["offloads"] == len(sizes)
    assert s["bytes_read"] >= sum(sizes) and s["fetch_bytes"] == sum(sizes)
    assert s["packed_tensors"] == 5 and s["direct_tensors"] == 2  # by aligned size
    for h in handles:
        engine.release(h)
    assert engine.live_handles() == 0
    assert engine.storage_usage()["used"] == 0


def test_a_list_of_paths_is_striped_over(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for d in dirs:
        d.mkdir()
    with spillway.Engine(dirs, capacity="96MiB", stripe_bytes="64KiB", **SMALL) as e:
        arrays = [blob(n, i) for i, n in enumerate([70_000, 3 << 20, 5 << 20, 1000])]
        handles = [e.offload((i, 0), region(a)) for i, a in enumerate(arrays)]
        e.drain()
        for h, a in zip(handles, arrays):
            out = np.zeros_like(a)
            e.fetch(h, region(out))
            np.testing.assert_array_equal(out, a)
        # Every directory holds an anonymous file: none has a name.
        assert all(os.listdir(d) == [] for d in dirs)
        # Each path's share, in the order given.
        members = e.stats()["members"]
        assert [m["path"] for m in members] == [str(d) for d in dirs]
        assert all(m["bytes_written"] > 0 and m["bytes_read"] > 0 and m["errors"] == 0 for m in members)
        assert sum(m["bytes_written"] for m in members) == e.stats()["bytes_written"]
    with spillway.Engine(dirs, capacity="96MiB", stripe_bytes="64KiB", stripe_weights=[1, 2, 1], **SMALL) as e:
        a = blob(5 << 20, 9)
        h = e.offload((0, 0), region(a))
        out = np.zeros_like(a)
        e.fetch(h, region(out))
        np.testing.assert_array_equal(out, a)
        # The second path takes two stripe units per round: twice the others' share.
        written = [m["bytes_written"] for m in e.stats()["members"]]
        assert written[1] == 2 * written[0] and written[0] == written[2], written
    with spillway.Engine(tmp_path / "a", capacity="8MiB", **SMALL) as e:
        assert e.stats()["members"] == []
    with pytest.raises(ValueError, match="stripe_bytes"):
        spillway.Engine(dirs, capacity="8MiB", stripe_bytes=1000, **SMALL)
    with pytest.raises(ValueError, match="stripe_weights"):
        spillway.Engine(dirs, capacity="8MiB", stripe_weights="1,2", **SMALL)
    with pytest.raises(ValueError, match="list of paths"):
        spillway.Engine(42, **SMALL)


def test_each_local_rank_takes_its_own_paths(tmp_path, monkeypatch):
    mine, other, given = tmp_path / "rank1", tmp_path / "rank0", tmp_path / "given"
    for d in (mine, other, given):
        d.mkdir()
    paths = f"0={other};1={mine}"
    monkeypatch.setenv("LOCAL_RANK", "1")
    with spillway.Engine(given, capacity="16MiB", rank_paths=paths, **SMALL) as e:
        assert e.path == str(mine)
        assert any("local rank 1 (LOCAL_RANK)" in n for n in e.notes), list(e.notes)
        a = blob(300_000, 5)
        h = e.offload((0, 0), region(a))
        out = np.zeros_like(a)
        e.fetch(h, region(out))
        np.testing.assert_array_equal(out, a)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="no entry for local rank 2"):
        spillway.Engine(given, capacity="16MiB", rank_paths=paths, **SMALL)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    with pytest.raises(ValueError, match="disagree"):
        spillway.Engine(given, capacity="16MiB", rank_paths=paths, **SMALL)


def test_the_same_storage_and_version_is_stored_once(engine):
    a = blob(2 << 20, 7)
    h1 = engine.offload((42, 3), region(a))
    h2 = engine.offload((42, 3), region(a))
    engine.drain()
    s = engine.stats()
    assert (s["dedup_hits"], s["dedup_bytes"]) == (1, a.nbytes)
    assert s["bytes_written"] == a.nbytes
    for h in (h1, h2):
        out = np.zeros_like(a)
        engine.fetch(h, region(out))
        np.testing.assert_array_equal(out, a)
    # A new version is a new copy.
    engine.offload((42, 4), region(a))
    engine.drain()
    assert engine.stats()["bytes_written"] == 2 * a.nbytes
    with pytest.raises(ValueError, match="other memory"):
        other = blob(2 << 20, 8)
        engine.offload((42, 3), region(other))


def test_prefetched_tensors_are_served_from_staging(engine):
    arrays = [blob(200_000, i) for i in range(8)]
    handles = [engine.offload((i, 0), region(a)) for i, a in enumerate(arrays)]
    engine.drain()
    for h in reversed(handles):
        engine.prefetch(h)
    for h, a in zip(reversed(handles), reversed(arrays)):
        out = np.zeros_like(a)
        engine.fetch(h, region(out))
        np.testing.assert_array_equal(out, a)
    s = engine.stats()
    assert s["prefetch_hits"] == len(arrays) and s["demand_reads"] == 0


def test_a_fetch_before_the_write_is_forwarded(tmp_path):
    with spillway.Engine(tmp_path, capacity="64MiB", pack_flush_delay_ms=10_000, **SMALL) as e:
        a = blob(64 << 10, 3)
        h = e.offload((1, 0), region(a))
        out = np.zeros_like(a)
        e.fetch(h, region(out))
        np.testing.assert_array_equal(out, a)
        s = e.stats()
        assert s["forwarded_fetches"] == 1 and s["bytes_written"] == 0
        assert not e.source_released(h), "the engine may still read the array until release"
        e.release(h)
        with pytest.raises(ValueError, match="unknown or released handle"):
            e.source_released(h)


def test_threads_share_one_engine(engine):
    errors = []

    def worker(t):
        try:
            for i in range(20):
                a = blob(10_000 + 997 * i, t * 100 + i)
                h = engine.offload((t * 1000 + i, 0), region(a))
                out = np.zeros_like(a)
                engine.fetch(h, region(out))
                np.testing.assert_array_equal(out, a)
                engine.release(h)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert engine.live_handles() == 0


def test_full_storage_keeps_tensors_resident(tmp_path):
    with spillway.Engine(tmp_path, capacity="64KiB", **SMALL) as e:
        arrays = [blob(2 << 20, i) for i in range(2)]
        handles = [e.offload((i, 0), region(a)) for i, a in enumerate(arrays)]
        e.drain()
        assert e.stats()["resident_tensors"] == 2
        for h, a in zip(handles, arrays):
            out = np.zeros_like(a)
            e.fetch(h, region(out))
            np.testing.assert_array_equal(out, a)
            e.release(h)


def test_injected_write_errors_keep_tensors_in_memory_and_are_reported(tmp_path):
    with spillway.Engine(tmp_path, capacity="64MiB", faults="write_error=1", **SMALL) as e:
        assert e.backend == "uring+faults"
        assert any(n.startswith("fault injection on: write_error=1") for n in e.notes), e.notes
        arrays = [blob(n, i) for i, n in enumerate([5000, 300_000, 2 << 20])]
        handles = [e.offload((i, 0), region(a)) for i, a in enumerate(arrays)]
        e.drain()
        assert not any(e.source_released(h) for h in handles), "their writes failed"
        for h, a in zip(handles, arrays):
            out = np.zeros_like(a)
            e.fetch(h, region(out))
            np.testing.assert_array_equal(out, a)
        s = e.stats()
        assert s["write_errors"] > 0 and s["bytes_written"] == 0, s
        assert s["forwarded_fetches"] == len(arrays), s
        faults = s["faults"]
        assert faults["plan"] == "write_error=1", faults
        assert faults["stats"]["injected_write_errors"] > 0, faults
        assert faults["stats"]["passed"] == 0, faults
        for h in handles:
            e.release(h)
    with spillway.Engine(tmp_path, capacity="1MiB", **SMALL) as e:
        assert "faults" not in e.stats()


def test_a_directory_gets_an_anonymous_file_and_a_file_is_kept(tmp_path):
    with spillway.Engine(tmp_path, capacity="1MiB", **SMALL) as e:
        assert os.listdir(tmp_path) == [], "the anonymous file is unlinked at once"
        assert e._native.anonymous
    f = tmp_path / "spill.bin"
    with spillway.Engine(f, capacity="1MiB", **SMALL) as e:
        assert not e._native.anonymous
    assert f.exists() and f.stat().st_size >= 1 << 20


def test_the_timeline_is_chrome_trace_json(tmp_path):
    with spillway.Engine(tmp_path, capacity="16MiB", timeline=True, **SMALL) as e:
        a = blob(100_000, 1)  # packed
        h = e.offload((1, 0), region(a))
        e.drain()
        out = np.zeros_like(a)  # kept alive: the engine writes into it
        e.fetch(h, region(out))
        e.write_trace(tmp_path / "trace.json")
        e.release(h)
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {ev.get("name") for ev in trace["traceEvents"]}
    assert {"pack", "write", "demand read"} <= names, names


def test_a_trace_path_that_is_a_symlink_is_refused_and_its_file_left_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    link = tmp_path / "trace.json"
    link.symlink_to(victim)
    with spillway.Engine(tmp_path, capacity="16MiB", timeline=True, **SMALL) as e:
        with pytest.raises(spillway.SpillwayError, match="is a symbolic link"):
            e.write_trace(link)
        assert victim.read_bytes() == b"precious"
        link.unlink()
        link.write_bytes(b"an old trace")
        e.write_trace(link)  # a file of one's own is replaced
    assert "traceEvents" in json.loads(link.read_text())
    assert link.stat().st_mode & 0o7777 == 0o600


def test_a_file_another_engine_has_open_is_refused(tmp_path):
    f = tmp_path / "same.bin"
    with spillway.Engine(f, capacity="16MiB", **SMALL) as e1:
        with pytest.raises(spillway.SpillwayError, match="is in use by another spillway engine"):
            spillway.Engine(f, capacity="16MiB", **SMALL)
        ones = np.ones(2 << 20, dtype=np.uint8)
        h = e1.offload((1, 0), region(ones))
        e1.drain()
        out = np.zeros_like(ones)
        e1.fetch(h, region(out))
        np.testing.assert_array_equal(out, ones)
        e1.release(h)
    with spillway.Engine(f, capacity="16MiB", **SMALL):
        pass  # free once the first is closed
    with pytest.raises(spillway.SpillwayError, match="listed twice, the same file both times"):
        spillway.Engine([f, f], capacity="16MiB", **SMALL)


def test_settings_are_documented_and_reported(engine):
    assert set(spillway.SETTINGS) == set(spillway._native.SETTING_NAMES)
    s = engine.settings
    assert s["staging_bytes"] == 8 << 20 and s["pack_threshold"] == 256 << 10
    assert engine.device == "host" and engine.backend == "uring"
    assert spillway.parse_size("4KiB") == 4096


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stagging_bytes=1), "unknown setting \"stagging_bytes\""),
        (dict(device="tpu"), "device=tpu"),
        (dict(backend="nvme"), "backend=nvme"),
        (dict(staging_bytes="lots"), "staging_bytes=lots"),
        (dict(queue_depth=0), "positive integer"),
        (dict(queue_depth=1 << 40), "at most 4096"),
        (dict(pack=1), "True or False"),
        (dict(alignment=1000), "power of two"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, kwargs, match):
    settings = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        spillway.Engine(tmp_path, capacity="1MiB", **settings)


def test_sizes_in_the_staging_memory_follow_one_rule(tmp_path):
    # Left at their defaults, prefetch and pack extent shrink to half a small staging memory
    # (as `spillway bench --staging` does); a size given that does not fit is refused by name.
    settings = {k: v for k, v in SMALL.items() if k not in ("staging_bytes", "prefetch_bytes", "pack_extent_bytes", "pack_threshold")}
    with spillway.Engine(tmp_path, capacity="1MiB", staging_bytes="64MiB", **settings) as e:
        s = e.settings
        assert s["prefetch_bytes"] == 32 << 20 and s["pack_extent_bytes"] == 16 << 20
    with pytest.raises(ValueError, match="prefetch_bytes .* exceeds staging_bytes"):
        spillway.Engine(tmp_path, capacity="1MiB", staging_bytes="64MiB", prefetch_bytes="128MiB", **settings)


def test_the_userspace_nvme_backend_takes_a_controller_address(tmp_path):
    with pytest.raises(ValueError, match="PCI address"):
        spillway.Engine(tmp_path, backend="spdk", **SMALL)
    # No controller there (nor any bound to vfio-pci on a test machine): named, with what to do.
    with pytest.raises(spillway.SpillwayError, match="0000:99:1f.7.*spillway nvme list"):
        spillway.Engine("0000:99:1f.7", backend="spdk", **SMALL)


def test_bad_calls_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="storage path is empty"):
        spillway.Engine("", capacity="1MiB", **SMALL)
    with pytest.raises(ValueError, match="capacity=-1"):
        spillway.Engine(tmp_path, capacity=-1, **SMALL)
    # More than the filesystem has is refused before anything is reserved, naming capacity=.
    with pytest.raises(ValueError, match="capacity=.*available"):
        spillway.Engine(tmp_path / "huge.bin", capacity=1 << 60, **SMALL)
    e = spillway.Engine(tmp_path, capacity="1MiB", **SMALL)
    a = blob(4096, 1)
    h = e.offload((1, 0), region(a))
    with pytest.raises(ValueError, match="holds 100 bytes but the tensor has 4096"):
        e.fetch(h, [(a.ctypes.data, 100)])
    with pytest.raises(ValueError, match="CUDA stream was given"):
        e.offload((2, 0), region(a), stream=1234)
    with pytest.raises(ValueError):
        e.fetch(987654, region(a))
    e.close()
    e.close()  # harmless
    assert e.closed
    with pytest.raises(ValueError, match="closed"):
        e.offload((3, 0), region(a))


def test_releasing_one_handle_of_a_key_does_not_wait_for_the_others(tmp_path):
    # Storage too small: the tensor stays in its own memory while any handle lives.
    with spillway.Engine(tmp_path, capacity="64KiB", **SMALL) as e:
        a = blob(2 << 20, 5)
        h1 = e.offload((9, 0), region(a))
        h2 = e.offload((9, 0), region(a))
        e.drain()
        assert e.stats()["resident_tensors"] == 1

        def release_in_thread(h):
            t = threading.Thread(target=e.release, args=(h,), daemon=True)
            t.start()
            t.join(timeout=10)
            return not t.is_alive()

        assert release_in_thread(h1), "the first release returns while h2 still uses the memory"
        assert not e.source_released(h2)
        assert release_in_thread(h2), "the last release returns once the engine let go"
        assert e.live_handles() == 0


def test_settings_come_from_the_file_then_the_environment_then_arguments(tmp_path, monkeypatch):
    config = tmp_path / "spillway.toml"
    config.write_text(
        'staging_bytes = "16MiB"\nprefetch_bytes = "4MiB"\npack_extent_bytes = "1MiB"\n'
        'queue_depth = 8\ndedup = false\npack_threshold = "64KiB"\n'
    )
    monkeypatch.setenv("SPILLWAY_CONFIG", str(config))
    monkeypatch.setenv("SPILLWAY_STAGING_BYTES", "12MiB")
    monkeypatch.setenv("SPILLWAY_QUEUE_DEPTH", "4")
    resolved = spillway.Engine.resolve_settings(staging_bytes="10MiB", device="host")
    assert resolved["staging_bytes"] == (10 << 20, "argument")
    assert resolved["queue_depth"] == (4, "environment variable SPILLWAY_QUEUE_DEPTH")
    assert resolved["dedup"] == (False, f"file {config}")
    assert resolved["pack_threshold"] == (64 << 10, f"file {config}")
    assert resolved["alignment"] == (4096, "default")
    settings = {k: v for k, v in SMALL.items() if k != "staging_bytes"}
    with spillway.Engine(tmp_path, capacity="1MiB", staging_bytes="10MiB", **settings) as e:
        s = e.settings
        assert s["staging_bytes"] == 10 << 20 and s["queue_depth"] == 4
        assert s["dedup"] is False and s["pack_threshold"] == 256 << 10
    monkeypatch.delenv("SPILLWAY_STAGING_BYTES")
    assert spillway.Engine.resolve_settings()["staging_bytes"] == (16 << 20, f"file {config}")


def test_the_settings_table_is_the_native_one():
    table = {name: (default, meaning, env) for name, default, meaning, env in spillway._native.SETTINGS_TABLE}
    assert list(spillway.SETTINGS) == list(spillway._native.SETTING_NAMES)
    for name, (default, meaning) in spillway.SETTINGS.items():
        assert table[name] == (default, meaning, "SPILLWAY_" + name.upper())
    assert spillway.SETTINGS["staging_bytes"][0] == 512 << 20
    assert spillway.SETTINGS["pack"][0] is True


@pytest.mark.parametrize("layer", ["file", "environment", "argument"])
def test_a_bad_value_is_refused_naming_the_setting_and_its_source(tmp_path, monkeypatch, layer):
    config = tmp_path / "spillway.toml"
    kwargs = {}
    if layer == "file":
        config.write_text('prefetch_bytes = "lots"\n')
        monkeypatch.setenv("SPILLWAY_CONFIG", str(config))
        where = f'{config}: prefetch_bytes = "lots"'
    elif layer == "environment":
        monkeypatch.setenv("SPILLWAY_PREFETCH_BYTES", "lots")
        where = 'environment variable SPILLWAY_PREFETCH_BYTES="lots"'
    else:
        kwargs["prefetch_bytes"] = "lots"
        where = "prefetch_bytes=lots"
    with pytest.raises(ValueError) as info:
        spillway.Engine(tmp_path, capacity="1MiB", **kwargs)
    msg = str(info.value)
    assert where in msg and "prefetch_bytes takes" in msg, msg


def test_unknown_names_and_unreadable_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPILLWAY_STAGING_BYTE", "1GiB")
    with pytest.raises(ValueError, match="SPILLWAY_STAGING_BYTE is not a spillway setting.*SPILLWAY_STAGING_BYTES"):
        spillway.Engine.resolve_settings()
    monkeypatch.delenv("SPILLWAY_STAGING_BYTE")
    config = tmp_path / "spillway.toml"
    config.write_text("stagging_bytes = 1\n")
    monkeypatch.setenv("SPILLWAY_CONFIG", str(config))
    with pytest.raises(ValueError, match='unknown key "stagging_bytes" \\(did you mean "staging_bytes"\\?\\)'):
        spillway.Engine(tmp_path, capacity="1MiB", **SMALL)
    monkeypatch.setenv("SPILLWAY_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="missing.toml.*SPILLWAY_CONFIG"):
        spillway.Engine.resolve_settings()


def test_settings_that_disagree_name_where_each_was_set(monkeypatch):
    monkeypatch.setenv("SPILLWAY_PREFETCH_BYTES", "1GiB")
    with pytest.raises(ValueError, match="prefetch_bytes: environment variable SPILLWAY_PREFETCH_BYTES"):
        spillway.Engine.resolve_settings()
    assert spillway.Engine.resolve_settings(staging_bytes="2GiB")["prefetch_bytes"][0] == 1 << 30


def test_a_flipped_byte_in_the_file_is_a_corrupt_data_error_with_checksums(tmp_path):
    path = tmp_path / "spill.bin"
    a, b = blob(300_000, 21), blob(2 << 20, 22)  # packed, and written on its own
    with spillway.Engine(path, capacity="64MiB", checksums=True, pack_flush_delay_ms=10_000, **SMALL) as e:
        assert e.settings["checksums"] is True
        handles = [e.offload((i, 0), region(x)) for i, x in enumerate((a, b))]
        e.drain()
        data = bytearray(path.read_bytes())
        for x in (a, b):
            at = bytes(data).find(x[:64].tobytes())
            assert at >= 0, "the tensor is in the file"
            with open(path, "r+b") as f:
                f.seek(at + x.nbytes - 7)
                f.write(bytes([data[at + x.nbytes - 7] ^ 0x80]))
                os.fsync(f.fileno())
        for h, x in zip(handles, (a, b)):
            out = np.zeros_like(x)
            e.prefetch(h)
            with pytest.raises(spillway.CorruptDataError, match="checksum mismatch"):
                e.fetch(h, region(out))
        s = e.stats()
        assert s["checksum_errors"] >= 2 and s["read_errors"] >= 2
        assert issubclass(spillway.CorruptDataError, spillway.SpillwayError)
        for h in handles:
            e.release(h)


def test_the_host_tier_takes_writes_spills_when_full_and_reads_back_from_either_tier(tmp_path):
    # 4 MiB of host tier, 24 MiB offloaded in 1 MiB tensors: the tier fills, spills to the
    # file, and every tensor comes back exact, from the tier or from storage.
    with spillway.Engine(tmp_path, capacity="64MiB", host_tier="4MiB", checksums=True, timeline=True, **SMALL) as e:
        arrays = [blob(1 << 20, 100 + i) for i in range(24)]
        handles = [e.offload((i, 0), region(a)) for i, a in enumerate(arrays)]
        e.drain()
        tier = e.stats()["host_tier"]
        assert tier["capacity"] == 4 << 20
        assert tier["bytes_in"] >= 24 << 20 and tier["bytes_spilled"] > 0, tier
        for i in reversed(range(24)):
            out = np.zeros_like(arrays[i])
            e.fetch(handles[i], region(out))
            np.testing.assert_array_equal(out, arrays[i])
        tier = e.stats()["host_tier"]
        assert tier["bytes_read_arena"] > 0 and tier["bytes_read_storage"] > 0, tier
        # The trace shows each tier's work on rows of its own.
        e.write_trace(tmp_path / "trace.json")
        events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
        rows = {ev.get("cat") for ev in events if ev.get("ph") == "X"}
        assert {"host tier: copy in", "host tier: spill to storage", "host tier: copy out"} <= rows, rows
        for h in handles:
            e.release(h)
        e.drain()
        assert e.stats()["host_tier"]["used"] == 0


def test_a_host_tier_larger_than_the_host_can_give_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="host_tier=.*pinned host memory.*set host_tier to at most"):
        spillway.Engine(tmp_path, capacity="64MiB", host_tier="1000TiB", **SMALL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threads=2**31), r"threads=2147483648: 2147483648 is too large: at most 256"),
        (dict(threads=1000), r"threads=1000: 1000 is too large: at most 256"),
        (dict(queue_depth=100_000), r"queue_depth=100000: 100000 is too large: at most 4096"),
        (dict(pinned_bytes=1), r"pinned_bytes=1: 1 is not a whole number of the 1048576-byte"),
        (dict(pack_flush_delay_ms=1e12), r"pack_flush_delay_ms=1000000000000.0: .*too long: at most 10000"),
    ],
)
def test_resource_settings_past_their_caps_are_refused_naming_them(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        spillway.Engine(tmp_path, capacity="8MiB", **SMALL, **kwargs)
    assert "--" not in str(e.value), str(e.value)


def test_a_null_region_or_lengths_that_overflow_are_refused(engine):
    a = blob(4096, 1)
    p = a.ctypes.data
    with pytest.raises(ValueError, match="offload region 0 has address 0"):
        engine.offload((1, 0), [(0, 4096)])
    with pytest.raises(ValueError, match="add up to more than 2\\^64"):
        engine.offload((2, 0), [(p, 2**63), (p, 2**63)])
    h = engine.offload((3, 0), region(a))
    with pytest.raises(ValueError, match="fetch region 0 has address 0"):
        engine.fetch(h, [(0, 4096)])
    out = np.zeros(4096, dtype=np.uint8)
    engine.fetch(h, region(out))
    assert (out == a).all()


def test_capacity_and_paths_that_cannot_be_storage_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"capacity=18446744073709551615 is too large: at most 9223372036854775807"):
        spillway.Engine(tmp_path, capacity=2**64 - 1, **SMALL)
    missing = f"{tmp_path}/nonexist/"
    with pytest.raises(spillway.SpillwayError, match="this directory does not exist: create it"):
        spillway.Engine(missing, capacity="8MiB", **SMALL)
    assert not os.path.exists(missing.rstrip("/"))
    for path in ["/proc", "/proc/self/mem"]:
        with pytest.raises(spillway.SpillwayError, match="is on procfs"):
            spillway.Engine(path, capacity="8MiB", **SMALL)


def test_no_error_names_a_command_line_flag(tmp_path):
    with pytest.raises(ValueError) as e:
        spillway.Engine(tmp_path, capacity="8MiB", pinned_bytes="1000", **SMALL)
    assert "--" not in str(e.value) and "pinned_bytes" in str(e.value), str(e.value)


def test_a_named_file_truncated_and_grown_underneath_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "spill.bin"
    a = blob(2 << 20, 7)
    with spillway.Engine(path, capacity="64MiB", checksums=False, **SMALL) as e:
        h = e.offload((1, 0), region(a))
        assert e.wait_source_released(h)
        size = os.path.getsize(path)
        os.truncate(path, 0)
        os.truncate(path, size)
        out = np.zeros_like(a)
        with pytest.raises(spillway.SpillwayError, match="changed underneath"):
            e.fetch(h, region(out))
