"""c8ctl subscribe writes each window whole: Ctrl-C never cuts a line in half."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from c8.clients.c8ctl import write_whole


def test_ctrl_c_during_a_write_waits_for_the_whole_window():
    r, w = os.pipe()
    data = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 200) for i in range(5000))  # 1 MB: >> a pipe
    got = bytearray()

    def reader():
        time.sleep(0.3)  # the write is blocked on a full pipe when Ctrl-C comes
        while chunk := os.read(r, 65536):
            got.extend(chunk)
            time.sleep(0.001)
    t = threading.Thread(target=reader)
    t.start()
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with os.fdopen(w, "wb") as out:
        with pytest.raises(KeyboardInterrupt):
            write_whole(out, data)
    t.join(10)
    os.close(r)
    assert bytes(got) == data  # every line, none cut
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_interrupts_a_write_that_blocks():
    r, w = os.pipe()  # nobody reads: the write blocks for good
    for delay in (0.1, 0.3):
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
    out = os.fdopen(w, "wb")
    try:
        with pytest.raises(KeyboardInterrupt):
            write_whole(out, b"x" * (4 << 20))
    finally:
        os.close(r)
        try:
            out.close()
        except OSError:
            pass
