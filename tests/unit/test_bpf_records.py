"""eBPF record layouts and filter configuration (no kernel)."""

import numpy as np
import pytest

from c8.collectors.bpf import filters as flt
from c8.collectors.bpf import records


def test_every_record_starts_with_the_common_header():
    for name, (tag, dt) in records.RECORDS.items():
        assert dt.names[:5] == ("tag", "nr", "uid", "gid", "ret"), name
        assert [dt.fields[n][1] for n in dt.names[:5]] == [0, 4, 8, 12, 16]
        assert dt["tag"] == np.dtype("<u4") and dt["ret"] == np.dtype("<i8")
        assert dt.itemsize % 8 == 0
        assert tag >> 16 == 0xC8B0


def test_tags_are_distinct_and_names_are_the_broker_contract():
    assert set(records.RECORDS) == {"open", "file1", "file2", "exec", "sock", "exit", "cwd"}
    assert len({t for t, _ in records.RECORDS.values()}) == len(records.RECORDS)


def test_sizes_and_string_widths():
    r = records.RECORDS
    assert r["open"][1]["filename"] == np.dtype("S256")
    assert r["file2"][1]["oldname"] == np.dtype("S256") == r["file2"][1]["newname"]
    assert r["exec"][1]["argv"] == np.dtype("S1024")
    assert r["sock"][1]["addr"].shape == (112,)
    assert {n: dt.itemsize for n, (_, dt) in r.items()} == {
        "open": 304, "file1": 312, "file2": 552, "exec": 1320, "sock": 168, "exit": 40, "cwd": 288}


def test_argv_text_turns_separators_into_spaces():
    a = np.array([b"/bin/true\0a\0b\0c", b"", b"one"], "S1024")
    assert records.argv_text(a).tolist() == [b"/bin/true a b c", b"", b"one"]


def test_registered_with_decoder_when_present():
    decode = pytest.importorskip("c8.collectors.decode")
    if not hasattr(decode, "bpf_records"):
        pytest.skip("decoder has no registry yet")
    reg = decode.bpf_records()
    for name, (tag, dt) in records.RECORDS.items():
        assert reg[tag] == (name, dt)


def test_filter_encoding_prefix_exact_uid():
    f = flt.encode({"prefixes": ["/etc/"], "exact": ["/bin/sh"], "uid": 1000,
                    "ignore_tgids": [1, 2]})
    assert len(f.config) == flt.CONFIG_SIZE and f.ignore_tgids == {1, 2} and not f.widened
    assert flt.matches(f.config, b"/etc/passwd", uid=1000)
    assert flt.matches(f.config, b"/bin/sh", uid=1000)
    assert not flt.matches(f.config, b"/bin/sh2", uid=1000)   # exact compares the NUL
    assert not flt.matches(f.config, b"/etc", uid=1000)
    assert not flt.matches(f.config, b"/etc/passwd", uid=0)


def test_empty_filter_passes_all():
    f = flt.encode(None)
    assert f.config == bytes(flt.CONFIG_SIZE)
    assert flt.matches(f.config, b"anything", uid=5, flags=0)


def test_filter_widens_what_it_cannot_express():
    long = "/x" * 100
    f = flt.encode({"exact": [long]})
    assert f.widened and flt.matches(f.config, (long + "/more").encode())
    many = flt.encode({"prefixes": [f"/p{i}" for i in range(flt.PATTERNS + 1)]})
    assert many.widened and flt.matches(many.config, b"/anything")
    assert flt.matches(flt.encode({"prefixes": [""]}).config, b"/z")


def test_flags_mask():
    f = flt.encode({"flags_mask": 0o100})
    assert flt.matches(f.config, b"/a", flags=0o101)
    assert not flt.matches(f.config, b"/a", flags=0o1)


def test_unknown_filter_key_is_refused():
    with pytest.raises(ValueError, match="unknown bpf filter keys"):
        flt.encode({"prefix": ["/etc"]})
