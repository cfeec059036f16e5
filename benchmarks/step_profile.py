"""Where a training step of the article's U-Net spends its time: ddpm-jax's XLA ops against PyTorch's.

    python benchmarks/step_profile.py [--batch 128] [--steps 10] [--top 20] [--no-torch] [--json out.json]

ddpm-jax: the jitted `train_step` (Adam 1e-3, batch 128, as configs/fashion.py trains) runs
`--steps` times under `jax.profiler`; each compiled op's time (a mean over the steps) is read
from the trace and grouped by what it computes, from the compiled HLO's metadata: the layer
(convolutions, stride 1 or strided/dilated; LayerNorm; SiLU; ...) and the pass (forward,
backward). PyTorch (optional, `pip install torch==2.13.0`): the re-statement in
`torch_article.py`, its step profiled with `torch.profiler`, self CPU time per aten op, grouped
the same way. An XLA op's time runs from its start to its completion: XLA runs independent
ops at once on its threads, so these overlap and add up to more than the step's wall time.
"""

import argparse
import collections
import gzip
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ddpm_jax import runtime  # noqa: E402

# An instruction of compiled HLO: its name and opcode; and the JAX op name in its metadata.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\b([a-z][a-z\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, tuple[set, list[str]]]:
    """{entry instruction: (the opcodes it runs, the JAX op names of what it computes)}, from compiled HLO.

    A fusion runs the opcodes and op names of its fused computation. An op XLA made itself
    (e.g. a kernel gradient's convolution) has no op name: it takes its operands'."""
    opcodes, op_names, operands, calls = {}, {}, {}, {}
    body_opcodes, body_op_names = collections.defaultdict(set), collections.defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+) [(]", line)
        if header:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        opcodes[name], op_names[name] = {opcode}, _OP_NAME.findall(line)
        if opcode == "convolution":  # a strided layer, or its gradient, has a stride or a dilation
            opcodes[name].add("strided" if re.search(r"stride=|dilate=", line) else "stride-1")
        elif 'custom_call_target="ddpm_jax_conv' in line:  # cpu_kernels.conv: stride 1 (also after space to depth)
            opcodes[name] |= {"convolution", "stride-1"}
        body_opcodes[computation].add(opcode)
        body_op_names[computation].extend(op_names[name])
        operands[name] = re.findall(r"%([\w.\-]+)", line.split("=", 1)[1].split("),")[0])
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[name] = called.group(1)
    for name, body in calls.items():
        opcodes[name] |= body_opcodes[body]
        op_names[name] = op_names[name] + body_op_names[body]
    for name in op_names:
        if not op_names[name]:
            op_names[name] = [op for operand in operands[name] for op in op_names.get(operand, [])]
    return {name: (opcodes[name], op_names[name]) for name in opcodes}


def category(opcodes: set, op_names: list[str]) -> str:
    """'layer / pass' of a compiled op, from its opcodes and the JAX op names it computes."""
    text = " ".join(op_names)
    backward = "transpose(jvp" in text
    if "convolution" in opcodes:
        layer = "convolutions, strided or dilated" if "strided" in opcodes else "convolutions, stride 1"
    elif "LayerNorm" in text:
        layer = "LayerNorm"
    elif "silu" in text:
        layer = "SiLU"
    elif "Dense" in text:
        layer = "time MLPs (Dense)"
    elif not text:
        return "copies and layout (no op name)"
    else:
        layer = "loss, noising, Adam, other"
    return f"{layer} / {'backward' if backward else 'forward'}"


def median_step_seconds(step, steps: int) -> float:
    """The median time of `steps` calls of step(i), after 3 untimed ones, without a profiler."""
    for i in range(3):
        step(i)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_jax(batch: int, steps: int) -> dict:
    import jax
    import optax
    from ddpm_jax.config import base_config
    from ddpm_jax.models import create_model
    from ddpm_jax.schedule import make_schedule
    from ddpm_jax.training import create_train_state, train_step

    config = base_config()
    model = create_model(config, (28, 28, 1))
    state = create_train_state(model, make_schedule(config.diffusion), optax.adam(config.optim.learning_rate),
                               jax.random.key(0), (28, 28, 1))
    x0 = jax.random.uniform(jax.random.key(1), (batch, 28, 28, 1), minval=-1.0, maxval=1.0)
    ops = hlo_ops(train_step.lower(state, x0, jax.random.key(2)).compile().as_text())

    def step(i):
        nonlocal state
        state, _ = jax.block_until_ready(train_step(state, x0, jax.random.key(i)))

    wall = median_step_seconds(step, steps)
    logdir = tempfile.mkdtemp(prefix="ddpm-jax-profile-")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # the ops only: Python tracing slows the step down
    with jax.profiler.trace(logdir, create_perfetto_trace=True, profiler_options=options):
        for i in range(steps):
            step(i)
    (trace_path,) = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(trace_path) as f:
        trace = json.load(f)
    # An op's event covers its start; an 'end: <op>' event marks when it completed (later, for the
    # ops XLA runs asynchronously on its thread pool, the convolutions among them).
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        if name.startswith("end: ") and name[5:] in ops:
            ends[name[5:]].append(event["ts"] + event.get("dur", 0))
        elif name in ops:
            starts[name].append((event["ts"], event["ts"] + event.get("dur", 0)))
    busy = collections.Counter()
    for name, events in starts.items():
        done = sorted(ends[name]) if len(ends[name]) == len(events) else [stop for _, stop in events]
        for (start, stop), end in zip(sorted(events), done):
            busy[name] += (max(stop, end) - start) / 1000 / steps  # us -> ms per step
    return {"wall_ms": wall * 1000, "ops": {name: (ms, category(*ops[name])) for name, ms in busy.items()}}


def torch_category(name: str, backward: bool) -> str:
    if "conv" in name:
        layer = "convolution (all kinds)"
    elif "layer_norm" in name:
        layer = "LayerNorm"
    elif "silu" in name:
        layer = "SiLU"
    elif name in ("aten::addmm", "aten::mm", "aten::linear"):
        layer = "time MLPs (Dense)"
    elif name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::empty", "aten::zero_", "aten::fill_"):
        return "copies and layout"
    else:
        layer = "loss, noising, Adam, other"
    return f"{layer} / {'backward' if backward else 'forward'}"


def profile_torch(batch: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import torch_article

    torch.set_num_threads(2)
    torch.manual_seed(0)
    step = torch_article.make_train_step(batch)
    wall = median_step_seconds(step, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    ops = {}
    for avg in prof.key_averages():
        if avg.self_cpu_time_total <= 0 or not avg.key.startswith("aten::") and "Backward" not in avg.key:
            continue
        ms = avg.self_cpu_time_total / 1000 / steps
        # autograd's *Backward0 nodes call aten ops of their own; their self time is the node's overhead
        ops[avg.key] = (ms, torch_category(avg.key, "backward" in avg.key.lower()))
    return {"wall_ms": wall * 1000, "ops": ops}


def summarise(result: dict) -> dict:
    totals = collections.Counter()
    for ms, cat in result["ops"].values():
        totals[cat] += ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="also list this many single ops of each")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    runtime.configure(reexec=True)
    results = {"ddpm_jax": profile_jax(args.batch, args.steps)}
    if not args.no_torch:
        results["torch"] = profile_torch(args.batch, args.steps)
    report = {}
    for who, result in results.items():
        totals = summarise(result)
        print(f"\n{who}: {result['wall_ms']:.1f} ms a step (wall), {sum(totals.values()):.1f} ms in ops")
        for cat, ms in totals.items():
            print(f"  {ms:8.1f} ms  {cat}")
        print(f"  top {args.top} ops:")
        for name, (ms, cat) in sorted(result["ops"].items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {ms:8.2f} ms  {name}  [{cat}]")
        report[who] = {"wall_ms": round(result["wall_ms"], 1),
                       "op_ms_by_category": {k: round(v, 2) for k, v in totals.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
