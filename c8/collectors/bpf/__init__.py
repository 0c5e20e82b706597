"""eBPF capture: syscall and sched tracepoint programs that read user memory
and write complete records into the sensor's per-CPU rings (BPF ring buffers,
or perf rings on kernels before 5.8).

Flow: ``asm`` (instructions -> bytes) -> ``programs`` (one enter/exit pair per
syscall, built from a table) -> ``syscalls`` (bpf(): maps, program load with
the verifier log) -> ``manager`` (load, attach, filter, unload per family; fd
passing on bpf.sock). ``records`` holds the record dtypes (the decoder's and
the broker's contract), ``filters`` the in-kernel filter config, ``btf`` the
kernel struct offsets, ``maps`` the map helpers (``output_set``).
"""
