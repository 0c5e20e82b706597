"""The supervisor: config -> host preparation (user, run_dir, cgroup) -> children.

config (converters) -> arbiter (prepare, loop, shutdown) -> children (states)
-> spawn (fork, cgroup, privileges, entry point). Imports no data-plane package.
"""
