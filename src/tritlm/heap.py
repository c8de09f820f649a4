"""The garbage collector around long generations: what is loaded at start-up is frozen out of its
sight.

A full collection walks every tracked object: after ``import torch`` and a model load that is
~100-200 ms with the GIL held. Left alone, the first one came during generation (a server's first
burst of requests: the 8 first streams' first tokens waited ~180 ms on it; a single user's stream
paused once). Objects loaded before generating live as long as the process, so
:func:`freeze_startup_heap` collects once and moves them to the permanent generation; later
collections walk only what generation allocates.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect, then freeze every object alive now (``gc.freeze``): call once the model is loaded."""
    gc.collect()
    gc.freeze()
