"""Settings for every test, whatever shell started pytest."""

import signal


def pytest_configure(config):
    # A shell starts a background job (`.ci/run &`, nohup) with SIGINT ignored, and an
    # ignored signal stays ignored across exec: every c8ctl a test then interrupts
    # would ignore its Ctrl-C. Tests start from what an interactive user has.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
