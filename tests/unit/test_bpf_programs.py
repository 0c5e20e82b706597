"""Program structure without a kernel: every program assembles, jumps land on
instructions, records fit their maps, and the enter/exit pairs cover each family."""

import pytest

from c8.collectors.bpf import losses, programs, records
from c8.collectors.bpf.asm import disassemble

MAPS = programs.MapFds(output=101, pending=102, scratch=103, config=104, ignore=105, counters=106)
PERF_MAPS = programs.MapFds(output=101, pending=102, scratch=103, config=104, ignore=105, counters=106,
                            ringbuf=False)
RINGBUF_OUTPUT, PERF_EVENT_OUTPUT = 130, 25
JMP_CLASSES = (0x05, 0x06)
OUTPUTS = pytest.mark.parametrize("maps", [MAPS, PERF_MAPS], ids=["ringbuf", "perf"])


def _all_programs(maps=MAPS):
    for fam, scs in programs.FAMILIES.items():
        for sc in scs:
            yield programs.enter_program(fam, sc, maps)
            yield programs.exit_program(fam, sc, maps)
    yield programs.sched_exit_program(maps, exit_code_offset=1164)


def _check(code: bytes, name: str) -> None:
    ins = disassemble(code)
    n = len(ins)
    wide_second = {i + 1 for i, x in enumerate(ins) if x[0] == 0x18}
    for i, (op, _dst, src, off, imm) in enumerate(ins):
        if i in wide_second:
            continue
        cls, jop = op & 0x07, op & 0xF0
        if cls in JMP_CLASSES and jop not in (0x80, 0x90):  # not call/exit
            t = i + 1 + off
            assert 0 <= t < n, f"{name}: jump at {i} leaves the program"
            assert t not in wide_second, f"{name}: jump at {i} lands inside ld_imm64"
        if op == 0x18 and src == 1:
            assert imm in (101, 102, 103, 104, 105, 106), f"{name}: unknown map fd {imm}"
    assert ins[-1][0] == 0x95, f"{name}: does not end with exit"


@OUTPUTS
def test_every_program_assembles_with_sane_jumps(maps):
    names = set()
    for p in _all_programs(maps):
        _check(p.assemble(), p.name)
        assert len(p.name) <= 15
        names.add(p.name)
    assert len(names) == 2 * sum(len(v) for v in programs.FAMILIES.values()) + 1


@OUTPUTS
def test_exit_programs_output_and_delete(maps):
    out, other = ((RINGBUF_OUTPUT, PERF_EVENT_OUTPUT) if maps.ringbuf
                  else (PERF_EVENT_OUTPUT, RINGBUF_OUTPUT))
    for fam, scs in programs.FAMILIES.items():
        for sc in scs:
            ins = disassemble(programs.exit_program(fam, sc, maps).assemble())
            calls = [imm for op, _d, _s, _o, imm in ins if op == 0x85]
            assert out in calls and other not in calls, sc.name
            assert calls.index(out) < calls.index(3), sc.name  # output then delete
            # the record's size, in r9: for a record of one name (name_len), the
            # bytes before the name plus name_len, bounded by the field's size
            dt = records.RECORDS[fam][1]
            size = [imm for op, d, _s, _o, imm in ins if op == 0xB7 and d == 9]
            if "name_len" in dt.names:  # up to the next (u64 - 4) boundary: no kernel padding
                added = [imm for op, d, _s, _o, imm in ins if op == 0x07 and d == 9]  # r9 += imm
                assert size == [records.NAME_LEN, dt.itemsize], sc.name
                assert added == [records.offset(dt, "filename") + 11, -4], sc.name
                assert records.offset(dt, "filename") + records.NAME_LEN == dt.itemsize
            else:
                assert size == [dt.itemsize]


def test_enter_programs_save_to_pending_and_never_output():
    for fam, scs in programs.FAMILIES.items():
        for sc in scs:
            ins = disassemble(programs.enter_program(fam, sc, MAPS).assemble())
            calls = [imm for op, _d, _s, _o, imm in ins if op == 0x85]
            assert 2 in calls and PERF_EVENT_OUTPUT not in calls and RINGBUF_OUTPUT not in calls, sc.name


def test_named_syscalls_have_name_filters_and_sock_has_none():
    ln_open = len(programs.enter_program("open", programs.FAMILIES["open"][1], MAPS))
    ln_sock = len(programs.enter_program("sock", programs.FAMILIES["sock"][0], MAPS))
    assert ln_open > 1000 > ln_sock


def test_scratch_has_slack_for_argv():
    assert programs.scratch_size("exec") == records.PREFIX_SIZE + records.RECORDS["exec"][1].itemsize + 1024
    assert programs.scratch_size("open") == records.PREFIX_SIZE + records.RECORDS["open"][1].itemsize


@pytest.mark.parametrize("family", list(programs.FAMILIES))
def test_fields_name_real_record_fields(family):
    dt = records.RECORDS[family][1]
    for sc in programs.FAMILIES[family]:
        assert set(sc.fields) <= set(dt.names), sc.name


def test_tracepoint_names():
    assert programs.tracepoints("exec") == [
        ("execve", "syscalls:sys_enter_execve", "syscalls:sys_exit_execve"),
        ("execveat", "syscalls:sys_enter_execveat", "syscalls:sys_exit_execveat")]


def _counted(ins) -> list[int]:
    """Counter entries a program adds to: the keys it stores at COUNTER_KEY, each
    followed by a lookup in the counters map and an atomic add of 1."""
    out = []
    for i, (op, dst, _src, off, imm) in enumerate(ins):
        if op == 0x62 and dst == 10 and off == programs.COUNTER_KEY:  # st W [fp-56], imm
            window = ins[i + 1: i + 12]
            assert any(x[0] == 0x18 and x[4] == MAPS.counters for x in window)  # the counters map
            assert any(x[0] == 0x85 and x[4] == 1 for x in window)  # map_lookup_elem
            assert any(x[0] == 0xDB and x[4] == 0 for x in window)  # lock *(u64 *) += (ATOMIC_ADD)
            out.append(imm)
    return out


def _after(ins, helper: int) -> list[tuple]:
    """The instructions after the call of ``helper``."""
    calls = [i for i, x in enumerate(ins) if x[0] == 0x85 and x[4] == helper]
    assert len(calls) == 1
    return ins[calls[0] + 1:]


@OUTPUTS
def test_exit_programs_count_failed_outputs_and_stale_records(maps):
    for fam, scs in programs.FAMILIES.items():
        for sc in scs:
            ins = disassemble(programs.exit_program(fam, sc, maps).assemble())
            assert _counted(ins) == [losses.index(fam, losses.OUTPUT), losses.index(fam, losses.STALE)]
            after = _after(ins, RINGBUF_OUTPUT if maps.ringbuf else PERF_EVENT_OUTPUT)
            # output's result tested right away: zero (success) skips the count
            assert after[0][0] == 0x15 and after[0][1] == 0 and after[0][4] == 0, sc.name
            assert _counted(after)[0] == losses.index(fam, losses.OUTPUT)


def test_enter_programs_count_failed_saves():
    for fam, scs in programs.FAMILIES.items():
        for sc in scs:
            ins = disassemble(programs.enter_program(fam, sc, MAPS).assemble())
            assert _counted(ins) == [losses.index(fam, losses.UPDATE)], sc.name
            after = _after(ins, 2)
            assert after[0][0] == 0x15 and after[0][1] == 0 and after[0][4] == 0, sc.name


def test_sched_exit_counts_failed_outputs():
    ins = disassemble(programs.sched_exit_program(MAPS, exit_code_offset=1164).assemble())
    assert _counted(ins) == [losses.index("exit", losses.OUTPUT)]


def test_counter_entries_are_distinct_and_fill_the_map():
    idx = {losses.index(f, c) for f in losses.FAMILIES for c in range(len(losses.COUNTERS))}
    assert idx == set(range(losses.ENTRIES))
    assert set(losses.FAMILIES) == set(programs.family_names())


def _process_keyed(ins) -> bool:
    """pid_tgid turned into (tgid << 32) | tgid before it is stored as the pending key:
    rsh 32, lsh 32, or (64-bit), then stx DW to fp-16."""
    ops = [(op, imm) for op, _d, _s, _o, imm in ins]
    for i in range(len(ops) - 5):
        if (ops[i][0], ops[i][1]) == (0x77, 32) and ops[i + 2] == (0x67, 32) and ops[i + 3][0] == 0x4F:
            st = ins[i + 4]
            return st[0] == 0x7B and st[1] == 10 and st[3] == programs.PID_TGID
    return False


def test_exec_records_are_keyed_by_process_the_rest_by_thread():
    # a thread that execs comes back from execve as the leader: its exit must find the record
    for fam, scs in programs.FAMILIES.items():
        for sc in scs:
            for prog in (programs.enter_program(fam, sc, MAPS), programs.exit_program(fam, sc, MAPS)):
                assert _process_keyed(disassemble(prog.assemble())) == (fam == "exec"), prog.name


TASK_MAPS = programs.MapFds(output=101, pending=102, scratch=-1, config=104, ignore=105, counters=106,
                            per_task=True)


def test_per_task_programs_build_in_place_and_mark_the_record_last():
    """The task-storage form: the enter gets (creating) this thread's record, writes
    the tag last (pending) and saves nothing in a map; the exit gets it without
    creating, outputs, then clears the tag. No HASH update or delete (lookups: config, ignored tgids, counters)."""
    for fam, scs in programs.FAMILIES.items():
        tag = records.RECORDS[fam][0]
        for sc in scs:
            enter = programs.enter_program(fam, sc, TASK_MAPS)
            _check(enter.assemble(), enter.name)
            ins = disassemble(enter.assemble())
            calls = [imm for op, _d, _s, _o, imm in ins if op == 0x85]
            assert 156 in calls and not {2, 3, PERF_EVENT_OUTPUT, RINGBUF_OUTPUT} & set(calls), sc.name
            get = calls.index(156)
            assert [imm for op, d, _s, _o, imm in ins if op == 0xB7 and d == 4][0] == 1, sc.name  # F_CREATE
            tag_stores = [i for i, (op, d, _s, off, imm) in enumerate(ins)
                          if op == 0x62 and d == 8 and off == 0 and imm & 0xFFFFFFFF == tag]
            assert len(tag_stores) == 1 and tag_stores[0] > get, sc.name
            exit_ = programs.exit_program(fam, sc, TASK_MAPS)
            _check(exit_.assemble(), exit_.name)
            ins = disassemble(exit_.assemble())
            calls = [imm for op, _d, _s, _o, imm in ins if op == 0x85]
            assert calls[:2] == [158, 156] and RINGBUF_OUTPUT in calls and not {2, 3} & set(calls), sc.name
            clear = [i for i, (op, d, _s, off, imm) in enumerate(ins) if op == 0x62 and d == 8 and off == 0 and imm == 0]
            out = max(i for i, x in enumerate(ins) if x[0] == 0x85 and x[4] == RINGBUF_OUTPUT)
            assert len(clear) == 1 and clear[0] > out, sc.name
