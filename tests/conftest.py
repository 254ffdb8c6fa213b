"""Test-session setup: eight CPU devices, so sharding tests can build real meshes."""

import os

# Must happen before jax initialises its backend; single-device tests are unaffected.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
