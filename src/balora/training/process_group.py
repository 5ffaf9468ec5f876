"""Ending a distributed run cleanly: every rank meets at a barrier, then destroys its process group.

Why by hand: neither the Trainer nor accelerate destroys the default process group when training ends,
and a process that exits with a gloo group alive can abort in interpreter finalisation ("terminate called
without an active exception", SIGABRT): gloo's worker threads still hold work objects whose tensors need
the GIL while Python is being torn down (pytorch/pytorch#179291, abandoned upstream). The launcher then
reports the whole run as failed although every artefact was written.
"""

from __future__ import annotations

import torch.distributed as dist


def release_process_group() -> bool:
    """Barrier, then ``destroy_process_group``; a no-op (False) outside a distributed run. Every rank must
    call it, after its last collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True
