"""One worker process of :class:`sfpk_jax.parallel.worker_pool.WorkerPool`, run as a script.

    python path/to/worker_main.py CORE

Started by the pool with the file's path, not as a module of the package, so
that it imports JAX alone (not the package's data and model layers). It pins
itself to ``CORE`` (-1: no pinning) before JAX starts, then answers pickled
messages on stdin with pickled replies on stdout, until stdin closes:

* ``("load", exported_bytes, shared, cache_dir)``: a serialized
  :mod:`jax.export` function and its first arguments, kept for the runs;
  ``cache_dir`` turns JAX's persistent compilation cache on there (or None).
* ``("run", items)``: ``fn(*shared, *item)`` for every item, in order.

Every reply is ``("ok", value)`` or ``("error", traceback text)``. Anything
else the process prints goes to stderr, so that stdout carries replies only.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback


def _serve(requests, replies) -> None:
    import jax  # after the pinning: XLA sizes its thread pools when it starts
    from jax.experimental.compilation_cache import compilation_cache

    fn, shared = None, None
    while True:
        try:
            message = pickle.load(requests)
        except EOFError:  # the pool closed stdin, or its process is gone
            return
        try:
            if message[0] == "load":
                _, exported, shared, cache_dir = message
                if cache_dir is not None:
                    jax.config.update("jax_compilation_cache_dir", cache_dir)
                    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
                    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
                    compilation_cache.reset_cache()
                fn = jax.jit(jax.export.deserialize(exported).call)
                shared = jax.device_put(shared)
                reply = ("ok", None)
            else:
                reply = ("ok", [jax.device_get(fn(*shared, *item)) for item in message[1]])
        except Exception:  # noqa: BLE001 - every failure goes back to the pool, whole
            reply = ("error", traceback.format_exc())
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


def main(argv: list[str]) -> None:
    core = int(argv[1])
    if core >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    # Replies go to the pool on the original stdout; fd 1 now points at stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main(sys.argv)
