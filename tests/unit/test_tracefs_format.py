"""Parsing tracefs format files (texts copied from this machine's kernel, 6.18)."""

from __future__ import annotations

import numpy as np
import pytest

from c8.collectors import tracefs

COMMON = """\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
"""


def fmt(name: str, event_id: int, body: str, pfmt: str = '"x"') -> str:
    return f"name: {name}\nID: {event_id}\nformat:\n{COMMON}\n{body}\nprint fmt: {pfmt}\n"


EXEC = fmt("sched_process_exec", 365, """\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;
""", '"filename=%s pid=%d old_pid=%d", __get_str(filename), REC->pid, REC->old_pid')

FORK = fmt("sched_process_fork", 366, """\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
""")

SYS_ENTER = fmt("sys_enter", 443, """\tfield:long id;\toffset:8;\tsize:8;\tsigned:1;
\tfield:unsigned long args[6];\toffset:16;\tsize:48;\tsigned:0;
""", '"NR %ld (%lx, %lx, %lx, %lx, %lx, %lx)", REC->id, REC->args[0], REC->args[1]')

OPENAT = fmt("sys_enter_openat", 782, """\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int dfd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:umode_t mode;\toffset:40;\tsize:8;\tsigned:0;
""")

NEWTASK = fmt("task_newtask", 205, """\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;
\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:40;\tsize:2;\tsigned:1;
""")

UPROBE = fmt("open_probe", 2326, """\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] path;\toffset:16;\tsize:4;\tsigned:1;
\tfield:s32 flags;\toffset:20;\tsize:4;\tsigned:1;
""", '"(%lx) path=\\"%s\\" flags=%d", REC->__probe_ip, __get_str(path), REC->flags')

# Not on this kernel's events used here; layout as include/trace/stages documents.
REL_LOC = fmt("rel_test", 9999, """\tfield:__rel_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;
\tfield:int x;\toffset:12;\tsize:4;\tsigned:1;
""")


def kinds(f: tracefs.EventFormat) -> dict[str, str]:
    return {x.name: x.kind for x in f.payload}


def test_exec_data_loc():
    f = tracefs.parse_format(EXEC, "sched")
    assert (f.source, f.id) == ("sched:sched_process_exec", 365)
    assert kinds(f) == {"filename": "data_loc", "pid": "int", "old_pid": "int"}
    assert [x.name for x in f.string_fields] == ["filename"]
    dt = f.raw_dtype()
    assert dt["filename"] == np.dtype("<u4") and dt["pid"] == np.dtype("<i4")
    assert dt.fields["old_pid"][1] == 16 and dt.itemsize == 20


def test_fork_two_strings():
    f = tracefs.parse_format(FORK, "sched")
    assert [x.name for x in f.string_fields] == ["parent_comm", "child_comm"]
    assert f.raw_dtype().fields["child_pid"][1] == 20


def test_sys_enter_array():
    f = tracefs.parse_format(SYS_ENTER, "raw_syscalls")
    args = f.payload[1]
    assert (args.name, args.kind, args.count) == ("args", "array", 6)
    dt = f.raw_dtype()
    assert dt["args"] == np.dtype(("<u8", (6,))) and dt["id"] == np.dtype("<i8")
    assert dt.itemsize == 64


def test_openat_sizes_come_from_the_file_not_the_c_type():
    f = tracefs.parse_format(OPENAT, "syscalls")
    dt = f.raw_dtype()
    # "int dfd" is 8 bytes unsigned in the syscall tracepoints' format
    assert dt["dfd"] == np.dtype("<u8") and dt["__syscall_nr"] == np.dtype("<i4")
    assert dt["filename"] == np.dtype("<u8")  # a user pointer, not a string
    assert f.string_fields == ()


def test_newtask_char_array_and_short():
    f = tracefs.parse_format(NEWTASK, "task")
    assert kinds(f)["comm"] == "chars"
    dt = f.raw_dtype()
    assert dt["comm"] == np.dtype("S16") and dt["oom_score_adj"] == np.dtype("<i2")
    raw = np.zeros(1, dt)
    raw["comm"] = b"bash"
    assert raw["comm"][0] == b"bash"


def test_uprobe_string_fetcharg():
    f = tracefs.parse_format(UPROBE, "c8probes")
    assert kinds(f) == {"__probe_ip": "int", "path": "data_loc", "flags": "int"}
    assert f.raw_dtype()["flags"] == np.dtype("<i4")


def test_rel_loc():
    f = tracefs.parse_format(REL_LOC, "x")
    assert kinds(f)["name"] == "rel_loc" and f.string_fields[0].offset == 8


def test_common_fields_are_not_payload():
    f = tracefs.parse_format(EXEC, "sched")
    assert all(x.is_common for x in f.fields[:4]) and not any(x.is_common for x in f.payload)


def test_garbage_is_refused():
    with pytest.raises(ValueError):
        tracefs.parse_format("name: x\nID: 1\nformat:\n\tfield:int a; offset:x;\n")
    with pytest.raises(ValueError):
        tracefs.parse_format("name: x\nID: 1\n")


def test_event_dir_rejects_bad_names(tmp_path):
    with pytest.raises(tracefs.TracefsError):
        tracefs.event_dir("nocolon", str(tmp_path))
    with pytest.raises(tracefs.TracefsError):
        tracefs.read_format("sched:nope", str(tmp_path))
