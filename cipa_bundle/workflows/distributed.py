"""The end of a distributed run: every rank waits for the others, then the default process group is destroyed.

``configs/multi_gpu_train.json`` calls :func:`end_distributed_run` in its ``finalize`` section.

Why the barrier comes first: PyTorch's gloo backend runs each collective on a worker thread. That thread releases
the collective's tensors, and with them the Python objects of tensors created in Python (the metrics' all-gather
buffers, for example), only *after* ``wait()`` has returned to the caller, and it has to take the GIL to do so.
``destroy_process_group`` does not stop those threads while ``DistributedDataParallel`` still holds the group, and
the group lives until interpreter shutdown. A rank with nothing left to do after its last all-gather (every rank but
0, which still writes the checkpoint) could therefore reach interpreter finalisation first. The worker thread then
asks for the GIL, CPython ends that thread with ``pthread_exit``, the forced unwind meets a ``noexcept`` destructor,
and the process aborts with ``terminate called without an active exception`` (SIGABRT, exit code -6), failing the
run after training succeeded. CI saw this on two CPU ranks, and so did 2 of 30 runs of the test's command here; the
core dump showed the ``AsyncAllgatherWork`` destructor on a ``ProcessGroupGloo::runLoop`` thread waiting for the GIL
while the main thread was inside ``Py_FinalizeEx``. With the barrier, 70 runs in a row passed.

In the barrier the main thread blocks with the GIL released until the slowest rank arrives, which leaves the worker
threads the time to release their finished work while the interpreter is fully alive. The barrier's own work holds
no tensors. NCCL runs its collectives on CUDA streams, not on such threads; the barrier costs one round trip there.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["end_distributed_run"]


def end_distributed_run() -> None:
    """Wait for all ranks, then destroy the default process group. Does nothing outside a distributed run."""
    if not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
