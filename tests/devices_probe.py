"""Runs an app with TensorFlow's first device listing replaced by a probe: it writes the
environment that CUDA would read at that moment (CUDA_VISIBLE_DEVICES, TF_FORCE_GPU_ALLOW_GROWTH)
to $DEVICES_PROBE_OUT as JSON and ends the process (exit 0), so the test sees what the app had
set before TensorFlow touched a device.

  DEVICES_PROBE_OUT=out.json python tests/devices_probe.py research.apps.train --flags...
  DEVICES_PROBE_MODULE=research.apps.train launch_local --module=devices_probe -- --flags...
"""

import json
import os
import runpy
import sys
import traceback

import research  # noqa: F401  (first, as in `python -m research.apps.x`: its import hook)
from tensorflow.python.eager import context  # noqa: E402

_original = context.Context._initialize_physical_devices


def _probe(self, reinitialize=False):
    if self._physical_devices is None:
        out = os.environ["DEVICES_PROBE_OUT"]
        if os.environ.get("TF_CONFIG"):  # a launch_local worker: one file each
            out += "." + str(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
        with open(out, "w") as f:
            json.dump({**{k: os.environ.get(k) for k in (
                "CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH")},
                "stack": traceback.format_stack()[-12:]}, f)
        sys.stdout.flush()
        os._exit(0)
    return _original(self, reinitialize)


context.Context._initialize_physical_devices = _probe
if os.environ.get("DEVICES_PROBE_MODULE"):  # as launch_local's --module: flags only
    module = os.environ["DEVICES_PROBE_MODULE"]
else:
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
