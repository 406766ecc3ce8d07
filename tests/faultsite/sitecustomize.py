"""On the PYTHONPATH of a test's subprocess only (tests/faults.py: fault_env): installs the fault hooks that
PEFTRUN_TEST_FAULT describes, so that `peftrun train` in this process (a rank of a launch too) runs with them."""

import os
import sys

_spec = os.environ.get("PEFTRUN_TEST_FAULT")
if _spec:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    from faults import FaultHooks

    from peftrun.training.hooks import install

    install(FaultHooks(_spec))
