"""The children's glibc heap settings: megabyte batches freed and allocated again
are served from memory already mapped, not faulted in afresh (c8/supervisor/heap.py)."""

import subprocess
import sys

# Batches of changing sizes (1 to 7 MiB) freed as the next is made, as a broker
# window's arrays are; prints the page faults that took.
WORKLOAD = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from c8.supervisor import heap
    assert heap.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
small = []
for i in range(60):
    window = np.ones((1 + i % 7) << 20, np.uint8)
    batch = np.ones(3 << 20, np.uint8)
    small.append(batch[:1].copy())
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_batches_are_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    assert kept * 3 < default, (kept, default)

