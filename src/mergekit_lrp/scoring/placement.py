"""Where ``lrp-compute`` keeps its sums and whether it checkpoints activations, decided
from the memory the device has free (``auto``) or as the user said: the one place that
decides, for the CLI and the Python API alike.

Sums kept where each parameter lives (``device``) cost no per-prompt host traffic: a
gradient is added to its float32 sum on its own GPU, and the sums reach the host only for
resume files and the final write, tensor by tensor. Host sums (``cpu``) cost 4 bytes a
parameter of host RAM and a device-to-host copy of every gradient per prompt, overlapped
with the device's work (:mod:`.host_adder`).
Gradient checkpointing recomputes each layer's forward in the backward pass (a third more
time) and is only worth it when the activations of a --max-length prompt do not fit.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from mergekit_lrp.scoring.options import ComputeError, decide_max_length

#: activation bytes a layer keeps per token and hidden unit for the backward pass, in
#: units of the weights' element size (attention inputs and outputs, MLP intermediates,
#: norms, residuals); a deliberately high estimate, so that auto errs toward checkpointing
ACTIVATION_FACTOR = 34
#: part of the free memory the plan may use: the rest is left for fragmentation, the
#: framework's own buffers and the logits
USABLE = 0.8


def decide_threads(requested: int | None, load=None, cores=None) -> tuple[int, str | None]:
    """CPU threads for the pass, and a note saying why when chosen here.

    ``requested`` (``--threads``) wins. Otherwise torch's default (one per core) is kept
    unless other processes already keep cores busy: then the cores they leave free, at
    least one. On two cores beside one two-thread process, two threads made a run ~30x
    slower than one (threads wait for each other at every operation); ``load`` (the
    1-minute load average) and ``cores`` (usable cores) default to the machine's.
    """
    if requested is not None:
        return requested, None
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    busy = load if load is not None else os.getloadavg()[0]
    chosen = max(1, min(torch.get_num_threads(), cores - int(busy + 0.5)))
    if chosen == torch.get_num_threads():
        return chosen, None
    return chosen, (
        f"threads auto: {chosen} (other processes keep about {busy:.1f} of {cores} cores "
        "busy; --threads N to choose)"
    )


@dataclass(frozen=True)
class Placement:
    sums_on_device: bool
    checkpointing: bool
    notes: tuple[str, ...]


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (host RAM for the CPU); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def activation_bytes(config, max_length: int, dtype: torch.dtype) -> int:
    """Estimated activations one ``max_length`` prompt keeps without checkpointing."""
    config = getattr(config, "text_config", None) or config
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * max_length * config.hidden_size * element * ACTIVATION_FACTOR


def sums_by_device(parameters: dict[str, torch.nn.Parameter]) -> dict[torch.device, int]:
    """Bytes of float32 sums each device would hold."""
    needed: dict[torch.device, int] = defaultdict(int)
    for parameter in parameters.values():
        needed[parameter.device] += 4 * parameter.numel()
    return dict(needed)


def plan(options, net, parameters, dtype, free=None) -> Placement:
    """Decide ``--accumulate-on`` and ``--gradient-checkpointing`` (see the module doc);
    ``free(device)`` gives a device's free bytes (default :func:`free_bytes`)."""
    free = free or free_bytes
    if options.max_length is None:
        options = decide_max_length(options, net.config)
    notes = []
    needed = sums_by_device(parameters)
    accelerated = any(device.type != "cpu" for device in needed)
    short = {
        device: (need, free(device))
        for device, need in needed.items()
        if device.type != "cpu" and free(device) is not None and need > USABLE * free(device)
    }
    if options.accumulate_on == "device":
        if short:
            device, (need, available) = next(iter(short.items()))
            raise ComputeError(
                f"--accumulate-on device needs {need / 2**30:.1f} GiB for the float32 sums on "
                f"{device}, which has {available / 2**30:.1f} GiB free; use --accumulate-on "
                "cpu or auto"
            )
        on_device = True
    elif options.accumulate_on == "cpu":
        on_device = False
    else:
        on_device = accelerated and not short
        if accelerated:
            notes.append(
                "accumulate-on auto: "
                + (
                    "sums on the parameters' devices"
                    if on_device
                    else "sums on the host, the devices have too little free memory for them"
                )
            )
    checkpointing = options.gradient_checkpointing
    if not options.signal.backward:
        checkpointing = False  # a forward-only pass keeps no activations for a backward
    elif checkpointing == "auto":
        device = next(iter(needed), torch.device("cpu"))
        available = free(device)
        if available is not None and on_device:
            available -= needed.get(device, 0)
        activations = activation_bytes(net.config, options.max_length, dtype)
        checkpointing = available is not None and activations > USABLE * available
        notes.append(
            f"gradient-checkpointing auto: {'on' if checkpointing else 'off'} (activations of "
            f"a {options.max_length}-token prompt ~{activations / 2**30:.2f} GiB, "
            + (f"{available / 2**30:.1f} GiB free" if available is not None else "free unknown")
            + ")"
        )
    return Placement(on_device, bool(checkpointing), tuple(notes))
