import os

# Idle OpenMP threads sleep rather than spin (as `fedmerge demo` sets): only effective when this
# runs before torch is first imported, harmless otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
