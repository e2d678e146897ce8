"""One worker process of :class:`sfpk_jax.parallel.worker_pool.WorkerPool`, run as a script.

    python path/to/worker_main.py CORE

Started by the pool with the file's path, not as a module of the package, so
that it imports JAX alone (not the package's data and model layers). It pins
itself to ``CORE`` (-1: no pinning) before JAX starts, then answers pickled
messages on stdin with pickled replies on stdout, until stdin closes:

* ``("load", exported_bytes, shared, cache)``: a serialized
  :mod:`jax.export` function, compiled at once, and its first arguments,
  kept for the runs;
  ``cache`` holds the ``jax.config`` values of the persistent compilation
  cache (:func:`sfpk_jax.parallel.compile_cache.settings`), or None.
* ``("run", items)``: ``fn(*shared, *item)`` for every item, in order.

Every reply is ``("ok", value)`` or ``("error", traceback text)``. Anything
else the process prints goes to stderr, so that stdout carries replies only.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback


def _compiled(jax, exported):
    """``exported`` compiled now, at load, so that a pool loads its workers one after the other
    from a warm cache (and a cold one compiles once, in the first worker)."""
    args, kwargs = jax.tree.unflatten(
        exported.in_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals])
    return jax.jit(exported.call).lower(*args, **kwargs).compile()


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
                _, exported, shared, cache = message
                for name, value in (cache or {}).items():
                    jax.config.update(name, value)
                if cache:
                    compilation_cache.reset_cache()
                fn = _compiled(jax, jax.export.deserialize(exported))
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
