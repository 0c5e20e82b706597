"""Per-CPU collectors: tracefs formats -> perf events -> one mmap ring per CPU
-> record walk -> numpy decode -> batches PUSHed to the broker.

Modules: ``tracefs`` (event ids and formats), ``perf`` (perf_event_open, ioctls,
mmap), ``ring`` (copying and walking the ring), ``decode`` (records -> structured
arrays), ``main`` (the collector process).
"""
