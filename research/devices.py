"""Devices, placed before TensorFlow starts: the one place every app passes through before
TensorFlow first touches a device.

CUDA reads `CUDA_VISIBLE_DEVICES` once, when TensorFlow first lists the devices, and
TensorFlow reads `TF_FORCE_GPU_ALLOW_GROWTH` when it creates a GPU's allocator; set later,
neither has any effect. `setup` therefore, in this order:
1. gives an srun task of a multi-worker job its share of the node's GPUs (`slurm_task_gpus`),
   unless SLURM bound the task's GPUs itself;
2. sets memory growth (`--gpu_memory_growth`, default true: a process takes GPU memory as it
   needs it, so evaluate, explain or TensorBoard can share a GPU with a training; false: all
   of every visible GPU at once, TensorFlow's own default);
3. splits the CPU into `cpu_replicas` logical devices if asked (the GPU-box simulation);
4. only then lists the devices, with CUDA's messages captured: if a GPU is expected here
   (`gpu_expected`) and none is found, it stops with one line quoting CUDA's own reason
   rather than training quietly on the CPU.
`launch_local` gives each worker its GPUs in the worker's environment (`split_gpus`), so they
too are set before the worker's TensorFlow starts. Nothing here imports TensorFlow before
step 4.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

from research.errors import UserError

GPU_ENV = "CUDA_VISIBLE_DEVICES"
GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"
_CUDA_REASON = re.compile(r"cuInit|CUDA_ERROR|cuda drivers|libcuda|cudart|driver version|"
                          r"CUDA driver|Cannot dlopen", re.IGNORECASE)


class DeviceError(UserError):
    """A device set-up the user can fix (no GPU where one is expected, too few GPUs)."""


def listed_gpus(env=None) -> list[str] | None:
    """The GPU ids CUDA_VISIBLE_DEVICES names (empty: none), or None if it is not set."""
    env = os.environ if env is None else env
    if GPU_ENV not in env:
        return None
    text = env[GPU_ENV].strip()
    if not text or text == "-1":
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def count_gpus(env=None) -> int:
    """The GPUs this process may use, without starting CUDA: CUDA_VISIBLE_DEVICES if set,
    else the lines of `nvidia-smi -L`, else 0."""
    listed = listed_gpus(env)
    if listed is not None:
        return len(listed)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def split_gpus(workers: int, per_worker: int, env=None) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES for `launch_local` (None: leave it as inherited):
    `per_worker` GPUs each, consecutive, from the ids this process may use; 0: an even share
    of them (None when there are fewer GPUs than workers, who then share them, or none).
    Asking for more than there are is one line."""
    env = os.environ if env is None else env
    listed = listed_gpus(env)
    ids = listed if listed is not None else [str(i) for i in range(count_gpus(env))]
    if per_worker == 0:
        per_worker = len(ids) // workers
        if not per_worker:
            return [None] * workers
    if per_worker * workers > len(ids):
        raise DeviceError(f"--gpus_per_worker={per_worker}: {workers} workers need "
                          f"{per_worker * workers} GPUs, {len(ids)} present "
                          f"({GPU_ENV}={env.get(GPU_ENV, 'unset')}, nvidia-smi -L)")
    return [",".join(ids[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


def slurm_task_gpus(env=None) -> str | None:
    """This srun task's share of its node's GPUs (SLURM_GPUS_ON_NODE split over the node's
    tasks by SLURM_LOCALID, from the ids SLURM made visible), or None when there is nothing
    to do: not an srun step, no GPUs, or SLURM already bound the task's own GPUs."""
    env = os.environ if env is None else env
    gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0)
    if not env.get("SLURM_STEP_NODELIST") or not gpus or "SLURM_LOCALID" not in env:
        return None
    from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
        expand_tasks_per_node)  # a pure parser; it does not start TensorFlow's runtime

    tasks = max(expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1")))
    per_task = gpus // tasks
    if per_task < 1:
        raise DeviceError(f"SLURM: {gpus} GPU(s) for {tasks} tasks on a node; give each task "
                          "at least one (--gpus-per-task)")
    listed = listed_gpus(env)
    if listed is not None and len(listed) == per_task:
        return None  # SLURM bound this task's GPUs (--gpus-per-task, --gpu-bind)
    ids = listed if listed else [str(i) for i in range(gpus)]
    local = int(env["SLURM_LOCALID"])
    return ",".join(ids[local * per_task:(local + 1) * per_task])


def gpu_expected(strategy: str = "auto", cpu_replicas: int = 0, env=None) -> str | None:
    """Why this process should find a GPU (None: it need not): nvidia-smi on the PATH, a
    non-empty CUDA_VISIBLE_DEVICES, or --strategy=mirrored without --cpu_replicas."""
    env = os.environ if env is None else env
    if listed_gpus(env) == []:
        return None  # CUDA_VISIBLE_DEVICES="" asks for the CPU
    if listed_gpus(env):
        return f"{GPU_ENV}={env[GPU_ENV]}"
    if shutil.which("nvidia-smi", path=env.get("PATH")):
        return "nvidia-smi is on the PATH"
    if strategy == "mirrored" and cpu_replicas <= 1:
        return "--strategy=mirrored without --cpu_replicas"
    return None


def prepare(memory_growth: bool = True, strategy: str = "auto") -> None:
    """Steps 1 and 2: the environment only; TensorFlow is not imported."""
    if strategy == "multi_worker":
        share = slurm_task_gpus()
        if share is not None:
            os.environ[GPU_ENV] = share
    os.environ[GROWTH_ENV] = "true" if memory_growth else "false"


@dataclasses.dataclass(frozen=True)
class Devices:
    gpus: tuple[str, ...]                     # the GPUs' names (device details), or ()
    capability: tuple[int, int] | None        # the lowest compute capability, None: no GPU


def setup(memory_growth: bool = True, strategy: str = "auto", cpu_replicas: int = 0
          ) -> Devices:
    """The four steps above; returns what was found. Call before any TensorFlow work."""
    prepare(memory_growth, strategy)
    from research import quiet

    with quiet.captured() as lines:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")  # CUDA starts here
    if not gpus:
        reason = gpu_expected(strategy, cpu_replicas)
        if reason:
            raise DeviceError(f"{reason}, but TensorFlow sees no GPU: {cuda_reason(lines)} "
                              f"(set {GPU_ENV}= to run on the CPU on purpose)")
    quiet.replay(lines)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, memory_growth)
        except RuntimeError:  # already initialised by an earlier setup in this process
            pass
    configure_cpu_replicas(cpu_replicas)
    return describe(gpus)


def cuda_reason(lines: list[str]) -> str:
    """CUDA's own words from TensorFlow's start-up lines, or what else explains no GPU."""
    import tensorflow as tf

    said = [re.sub(r"^[IWEF]\d{4} [\d:. ]+\s*\d+ \S+:\d+\] ", "", line).strip()
            for line in lines if _CUDA_REASON.search(line)]
    if said:
        return "; ".join(dict.fromkeys(said))
    if not tf.test.is_built_with_cuda():
        return ("this TensorFlow is built without CUDA (pip install "
                "'tensorflow[and-cuda]', see BUILD.md 'On a GPU box')")
    return "CUDA gave no reason"


def describe(gpus) -> Devices:
    import tensorflow as tf

    names, caps = [], []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
        if details.get("compute_capability"):
            caps.append(tuple(details["compute_capability"]))
    return Devices(tuple(names), min(caps) if caps else ((0, 0) if gpus else None))


def current() -> Devices:
    """What setup found (the GPUs TensorFlow lists; this starts CUDA if nothing has)."""
    import tensorflow as tf

    return describe(tf.config.list_physical_devices("GPU"))


def gpu_memory(query: str = "memory.total") -> int | None:
    """Bytes of `query` (nvidia-smi's memory.total or memory.free) of the least endowed GPU
    in use (the ids CUDA_VISIBLE_DEVICES names, else all); None if unknown."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, f"--query-gpu=index,{query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        if mib.strip().isdigit():
            found[index.strip()] = int(mib) * 2 ** 20
    listed = listed_gpus()
    chosen = [found[i] for i in (listed if listed else found) if i in found]
    return min(chosen) if chosen else None


def host_available() -> int | None:
    """The host's available memory (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def replicas(cpu_replicas: int = 0) -> int:
    """The replicas --strategy=auto trains on here: every GPU, else the CPU's logical devices
    (--cpu_replicas), else 1."""
    return len(current().gpus) or max(1, cpu_replicas)


def configure_cpu_replicas(n: int) -> None:
    """Splits the CPU into n logical devices (before TensorFlow initialises its devices)."""
    if n <= 1:
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    current_split = tf.config.get_logical_device_configuration(cpus[0])
    if current_split and len(current_split) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise DeviceError(f"--cpu_replicas={n}: TensorFlow is already initialised with "
                          f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); "
                          "set it before any TensorFlow work") from e


def precision_note(devices: Devices) -> str:
    """What --precision=auto picks on these devices and why, for the device line."""
    from research import machine

    if devices.capability is None:
        return f"auto: {machine.resolve_precision('auto', None)} (no GPU)"
    cap = ".".join(map(str, devices.capability))
    auto = machine.resolve_precision("auto", devices.capability)
    return f"compute capability {cap}, auto: {auto}"
