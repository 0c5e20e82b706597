"""Facts read from the host: /proc, tracefs, runtime state files, runtime APIs.

The one place every process reads them, so each rule holds everywhere:
regular files only (a FIFO or a device is refused before any read), no
following of symlinks where someone else controls the path, a size cap on
every read, a total deadline and a body cap on every socket, and JSON checked
for the types actually used. Monitored processes and their files are
untrusted input (docs/security.md).

- :mod:`c8.host.files`    bounded, non-blocking reads of regular files; JSON
- :mod:`c8.host.typed`    typed access to parsed JSON (wrong type -> default)
- :mod:`c8.host.proc`     /proc/<pid>/{cmdline,stat,status,cgroup,cwd,fd,exe,task}
- :mod:`c8.host.tracefs`  where tracefs is
- :mod:`c8.host.unixhttp` GET on an HTTP API over a unix socket (docker)
"""
