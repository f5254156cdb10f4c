"""The suite drops compiled programs (conftest.py): compiling maps memory, and dropping frees it."""

import jax
import jax.numpy as jnp
import pytest
from helpers import memory_mappings, release_compiled_programs

PROGRAMS = 40


@pytest.mark.skipif(memory_mappings() is None, reason="counts the memory mappings of Linux's /proc")
def test_releasing_compiled_programs_unmaps_what_compiling_them_mapped():
  jnp.zeros(1).block_until_ready()  # the CPU backend's own pools and arenas exist before counting
  release_compiled_programs()
  before = memory_mappings()[0]
  functions = [jax.jit(lambda x, k=k: jnp.cumsum(x) * k) for k in range(PROGRAMS)]
  for k, f in enumerate(functions):
    f(jnp.ones(k + 1)).block_until_ready()  # one program per function and shape
  compiled = memory_mappings()[0]
  assert compiled - before > 4 * PROGRAMS  # each program maps several regions (about 14 on XLA:CPU here)
  release_compiled_programs()  # the functions stay alive, as a module's jitted functions do
  assert memory_mappings()[0] - before < (compiled - before) / 4
