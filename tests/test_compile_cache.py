"""The persistent compilation cache of the experiments: where it is, its flags, and that it loads.

* The folder: ``--compile-cache``, else ``SFPK_JAX_COMPILE_CACHE`` (``off``
  turns it off), else ``$XDG_CACHE_HOME/sfpk_jax/jax``, else ``~/.cache/...``;
  ``--no-compile-cache`` leaves it off.
* Once enabled, a program compiled, dropped from memory and asked for again
  is loaded from the folder (a cache hit), even a small, quick one.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.harness import compile_cache
from sfpk_jax.parallel import compile_cache as library_cache

CACHE_HIT = "/jax/compilation_cache/cache_hits"


def _parse(*argv):
    parser = argparse.ArgumentParser()
    compile_cache.add_flags(parser)
    return parser.parse_args(list(argv))


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "sfpk_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "sfpk_jax" / "jax"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "OFF")
    assert compile_cache.default_dir() is None


@pytest.fixture
def restore_cache():
    """Puts the suite's cache folder back after a test that moves it."""
    before = jax.config.jax_compilation_cache_dir
    yield
    if before is None:
        library_cache.apply({"jax_compilation_cache_dir": None})
    else:
        compile_cache.enable(before)


def test_flags_choose_or_turn_off_the_folder(monkeypatch, tmp_path, restore_cache):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.configure(_parse("--no-compile-cache")) is None
    assert not (tmp_path / "env").exists()
    assert compile_cache.configure(_parse("--compile-cache", str(tmp_path / "flag"))) == tmp_path / "flag"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    assert compile_cache.configure(_parse()) == tmp_path / "env"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.configure(_parse()) is None


def test_a_small_program_is_stored_and_loaded_again(tmp_path, restore_cache):
    hits = []

    def listen(event, **kwargs):
        del kwargs
        if event == CACHE_HIT:
            hits.append(event)

    compile_cache.enable(tmp_path / "cache")
    # A constant of this test's own, so that no other test's program matches.
    program = jax.jit(lambda x: jnp.sin(x) * np.float32(0.123456))
    x = jnp.arange(5, dtype=jnp.float32)
    first = np.asarray(program(x))
    assert any((tmp_path / "cache").iterdir()), "nothing was written to the cache"
    jax.clear_caches()  # forget the compiled program in memory
    jax.monitoring.register_event_listener(listen)
    try:
        again = np.asarray(program(x))
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert hits, "the program was compiled again instead of loaded from the cache"
    np.testing.assert_array_equal(first, again)
