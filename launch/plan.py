"""`scalesft plan`: what a recipe does at each world size, before anything runs.

    scalesft plan RECIPE [section.key=value ...] --nodes 1,2 --gpus-per-node 8 [--strategy zero3] [--json]

For every (nodes x gpus-per-node) asked: micro batch (rows, or with micro_batch_size auto on padding-free data a
token budget per micro-step), gradient accumulation, global batch, the most tokens one optimizer step can hold,
steps per epoch (when the data is a local file), precision, checkpointing, the resolved QLoRA load settings and
the exact `accelerate launch` command of every node (machine rank 0..nodes-1). A world size that cannot run the
recipe is marked with the reason and the nearest valid global batch; the others are still planned. Loads no
model.

The commands come from launch/render.py render_launch, the renderer each Slurm node calls (launch/slurm.py
node_command): on Slurm every node runs exactly its command here, except that the launcher is
`python -m accelerate.commands.launch` instead of `accelerate launch` and the main host and port
(MAIN_NODE_IP and --port here) are filled in from the allocation. `scalesft slurm --dry-run` prints those.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scalesft.core.batch import BatchError, nearest_global_batches, repeated_rows_per_epoch, steps_per_epoch
from scalesft.core.hardware import precision as resolve_precision, quant_compute_dtype
from scalesft.core.memory import DEFAULT_GPU_GIB, choose_batching, plan_memory
from scalesft.core.strategy import STRATEGIES, get_strategy, recipe_layout
from scalesft.launch.preflight import check_rows, count_rows, planned_hardware_here, train_rows
from scalesft.launch.render import LaunchError, render_launch


def _nearest_global(recipe, world: int) -> list[int]:
    """The valid global batches nearest to the recipe's at this world size."""
    t, d = recipe.training, recipe.data
    if t.micro_batch_size != "auto":
        return nearest_global_batches(t.global_batch_size, t.micro_batch_size * world)
    if d.padding_free and not d.packing:  # token micro-batches: any global batch >= world
        return [max(t.global_batch_size, world)]
    return nearest_global_batches(max(t.global_batch_size, world), world)


def plan_entries(recipe, *, recipe_path: str, overrides: list[str], nodes: list[int], gpus_per_node: list[int],
                 strategy: str, cpu: bool = False, main_process_ip: str | None = None,
                 main_process_port: int = 29500, accelerate_config: str | None = None,
                 gpu_memory_gib: float | None = None) -> list[dict[str, Any]]:
    """One dict per world size; a world size that cannot run the recipe gets an entry with "error" (and the
    nearest valid global batches) instead of stopping the others. Raises StrategyError / LaunchError on
    input that no world size can fix."""
    from scalesft.trainer.assets import model_shape

    spec = get_strategy(strategy)
    t, q = recipe.training, recipe.quantization
    gpu_gib = None if cpu else (gpu_memory_gib or DEFAULT_GPU_GIB)
    hw = planned_hardware_here(cpu=cpu, gpu_memory_gib=gpu_gib)
    precision = resolve_precision(t.precision, hw)
    shape = model_shape(recipe.model.name_or_path)
    layout_of = {w: recipe_layout(recipe, strategy=strategy, world_size=w, hw=hw, precision=precision)
                 for w in {n * g for n in nodes for g in gpus_per_node}}
    rows = count_rows(recipe.data.path)
    n_train = None if rows is None else train_rows(rows, limit=recipe.data.limit,
                                                  eval_fraction=recipe.data.eval_fraction)
    L = recipe.data.max_seq_length
    entries = []
    for n in nodes:
        for g in gpus_per_node:
            world = n * g
            head = {"world_size": world, "nodes": n, "gpus_per_node": g, "strategy": strategy}
            try:
                batching = choose_batching(recipe, shape, strategy=strategy, world_size=world, precision=precision,
                                           gpu_gib=gpu_gib)
                if n_train is not None:
                    check_rows(n_train, world, where=f"the training set ({recipe.data.path})")
            except (BatchError, LaunchError) as e:
                entries.append({**head, "error": str(e), "nearest_global_batch_size": _nearest_global(recipe, world),
                                "strategy_summary": spec.summary})
                continue
            batch = batching.rows
            spe = repeated = None
            if n_train is not None:
                spe = steps_per_epoch(n_train, t.global_batch_size)
                if batch is not None:
                    repeated = repeated_rows_per_epoch(n_train, batch.micro_batch_size, world)
                else:
                    tail = n_train % t.global_batch_size
                    repeated = world - tail if 0 < tail < world else 0
            total = t.max_steps if t.max_steps > 0 else (None if spe is None else
                                                         max(1, round(spe * t.num_train_epochs)))
            cmds = [render_launch(recipe=recipe_path, overrides=overrides, strategy=strategy, num_processes=world,
                                  num_machines=n, machine_rank=rank,
                                  main_process_ip=main_process_ip or ("MAIN_NODE_IP" if n > 1 else None),
                                  main_process_port=main_process_port, cpu=cpu, accelerate_config=accelerate_config)
                    for rank in range(n)]
            cmd = cmds[0]
            tokens = batching.micro_batch_tokens if batch is None else batch.micro_batch_size * L
            entries.append({
                **head,
                "batching": "tokens" if batch is None else "rows",
                "micro_batch_auto": batching.auto,
                "micro_batch_tokens_from": batching.budget_source or None,
                "micro_batch_size": None if batch is None else batch.micro_batch_size,
                "micro_batch_tokens": batching.micro_batch_tokens,
                "gradient_accumulation_steps": None if batch is None else batch.gradient_accumulation_steps,
                "max_gradient_accumulation_steps": (batching.max_accumulation if batch is None
                                                    else batch.gradient_accumulation_steps),
                "global_batch_size": t.global_batch_size,
                "max_tokens_per_step": t.global_batch_size * L,
                "train_rows": n_train, "steps_per_epoch": spe, "repeated_rows_per_epoch": repeated,
                "optimizer_steps": total,
                "precision": precision,
                "gpu_memory_gib": gpu_gib,
                "layout": layout_of[world].fields(),
                "layout_notes": list(layout_of[world].notes),
                "quantization": {"bits": q.bits, "quant_type": q.quant_type if q.bits == 4 else None,
                                 "double_quant": q.double_quant if q.bits == 4 else None,
                                 "compute_dtype": quant_compute_dtype(q.compute_dtype, precision) if q.bits
                                 else None},
                "strategy_summary": spec.summary,
                "memory": (memory := plan_memory(recipe, shape, strategy=strategy, world_size=world,
                                                 precision=precision, tokens=tokens)),
                "memory_unavailable": None if memory else _no_memory_reason(recipe, precision),
                "command": cmd.shell(), "argv": cmd.argv, "env": cmd.env,  # node 0's
                "node_commands": [{"machine_rank": rank, "command": c.shell(), "argv": c.argv, "env": c.env}
                                  for rank, c in enumerate(cmds)],
            })
    return entries


def _micro(e: dict[str, Any]) -> str:
    return f"{e['micro_batch_tokens']} tok" if e["batching"] == "tokens" else str(e["micro_batch_size"])


def _accum(e: dict[str, Any]) -> str:
    return f"<={e['max_gradient_accumulation_steps']}" if e["batching"] == "tokens" else \
        str(e["gradient_accumulation_steps"])


def format_plan(entries: list[dict[str, Any]], recipe_path: str) -> str:
    ok = [e for e in entries if "error" not in e]
    e0 = ok[0] if ok else entries[0]
    lines = [f"recipe {recipe_path} · strategy {e0['strategy']}: {e0['strategy_summary']}",
             f"{'world':>5} {'nodes':>5} {'gpus/node':>9} {'micro':>10} {'accum':>5} {'global':>6} "
             f"{'max tokens/step':>15} {'steps/epoch':>11} {'opt steps':>9}"]
    for e in entries:
        if "error" in e:
            lines.append(f"{e['world_size']:>5} {e['nodes']:>5} {e['gpus_per_node']:>9} cannot run: see below")
            continue
        lines.append(f"{e['world_size']:>5} {e['nodes']:>5} {e['gpus_per_node']:>9} {_micro(e):>10} "
                     f"{_accum(e):>5} {e['global_batch_size']:>6} "
                     f"{e['max_tokens_per_step']:>15} {_dash(e['steps_per_epoch']):>11} "
                     f"{_dash(e['optimizer_steps']):>9}")
    for e in entries:
        if "error" in e:
            near = " or ".join(str(g) for g in e["nearest_global_batch_size"])
            lines.append(f"world size {e['world_size']} cannot run: {e['error']} (nearest valid global batch at "
                         f"this world size: {near})")
    if not ok:
        return "\n".join(lines)
    if any(e["batching"] == "tokens" for e in ok):
        src = next(e for e in ok if e["batching"] == "tokens")["micro_batch_tokens_from"]
        lines.append("micro batch: auto, sized by tokens (padding-free rows): each GPU's share of a step is split "
                     "into micro-batches of at most that many tokens; the trainer fixes the accumulation (at most "
                     f"the accum shown: every row max_seq_length long) from the data's lengths at start; budget "
                     f"from {src}")
    elif any(e["micro_batch_auto"] for e in ok):
        src = next(e for e in ok if e["micro_batch_auto"])["micro_batch_tokens_from"]
        lines.append("micro batch: auto, the largest row count that divides global / world and whose rows fit the "
                     f"token budget of {src} (padded or packed rows)")
    q, lay = e0["quantization"], e0["layout"]
    lines.append(f"precision {e0['precision']} · gradient checkpointing {lay['checkpointing']} · attention "
                 f"{lay['attention']} · LoRA forward {lay['lora']}")
    placement = ('{"": local_rank}' if lay["device_map"] == "local_rank" else "none (the strategy places weights)")
    if q["bits"] is None:
        lines.append(f"quantization: none (LoRA on unquantized weights) · device_map {placement}")
    else:
        quant = f"{q['bits']}-bit" + (f" {q['quant_type']}, double quant {q['double_quant']}" if q["bits"] == 4 else "")
        lines.append(f"QLoRA: {quant}, compute dtype {q['compute_dtype']}, quant storage {lay['quant_storage']}, "
                     f"device_map {placement}")
    lines += e0["layout_notes"]
    if e0["train_rows"] is None:
        lines.append("steps per epoch: unknown until the data loads (not a local file)")
    for e in ok:
        if e["repeated_rows_per_epoch"]:
            lines.append(f"world size {e['world_size']}: {e['train_rows']} rows do not fill whole micro batches on "
                         f"every rank; each epoch repeats {e['repeated_rows_per_epoch']} rows at its end")
    for e in ok:
        m = e.get("memory")
        if m:
            ck = "on" if m["recipe_checkpointing"] else "off"
            lines.append(f"predicted peak memory per GPU at world size {e['world_size']}: "
                         f"{m['peak_gib_checkpointing']} GiB with activation checkpointing, "
                         f"{m['peak_gib_no_checkpointing']} GiB without (recipe: {ck}; core/memory.py)")
    if e0.get("memory_unavailable"):
        lines.append(f"predicted peak memory: {e0['memory_unavailable']}")
    for e in ok:
        for node in e["node_commands"]:
            lines.append(f"command (node {node['machine_rank']} of {e['nodes']}, world size {e['world_size']}):")
            lines.append(f"  {node['command']}")
    if any(e["nodes"] > 1 for e in ok):
        lines.append("on Slurm (scalesft slurm) each node runs its command above with `python -m "
                     "accelerate.commands.launch` for `accelerate launch` and the allocation's main host and port")
    return "\n".join(lines)


def _no_memory_reason(recipe, precision: str) -> str:
    if precision == "fp32":
        return "no estimate for fp32 (CPU) runs: the model covers bf16/fp16 GPU training"
    return (f"no config.json for model.name_or_path '{recipe.model.name_or_path}' on this machine (not a local "
            "folder, not in the local HF cache): download the model or give its local folder")


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return values


def add_plan_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--nodes", type=_int_list, action="extend", default=None,
                   help="node counts to plan, e.g. 1 or 1,2,4 (default 1)")
    p.add_argument("--gpus-per-node", type=_int_list, action="extend", default=None,
                   help="processes per node, e.g. 8 or 2,4,8 (default 1)")
    p.add_argument("--strategy", default="ddp", choices=list(STRATEGIES))
    p.add_argument("--cpu", action="store_true", help="plan CPU processes (gloo, fp32) instead of GPUs")
    p.add_argument("--accelerate-config", default=None, help="use this accelerate config instead of the shipped one")
    p.add_argument("--port", type=int, default=29500, help="main process port")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory per GPU that micro_batch_size auto plans for (default: this machine's GPU, else "
                        f"{DEFAULT_GPU_GIB:g})")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per world size")
    return p


def entries_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    """plan_entries for the parsed `scalesft plan` arguments."""
    from scalesft.core.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    return plan_entries(recipe, recipe_path=args.recipe, overrides=args.overrides, nodes=args.nodes or [1],
                        gpus_per_node=args.gpus_per_node or [1], strategy=args.strategy, cpu=args.cpu,
                        main_process_port=args.port, accelerate_config=args.accelerate_config,
                        gpu_memory_gib=args.gpu_memory or (None if args.cpu else _local_gpu_gib()))


def plan_command(args: argparse.Namespace) -> int:
    entries = entries_for(args)
    print(json.dumps(entries, indent=2) if args.json else format_plan(entries, args.recipe))
    if all("error" in e for e in entries):  # nothing can run: say why on stderr too, and fail
        raise BatchError(f"world size {entries[0]['world_size']}: {entries[0]['error']}")
    return 0


def _local_gpu_gib() -> float | None:
    """This machine's GPU memory, when torch is installed and sees one (a login node usually has none)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def plan_cli(args: argparse.Namespace) -> int:
    from scalesft.launch.run import one_line_errors

    if not args.json:
        return one_line_errors("scalesft plan", plan_command, args)
    # --json: stdout carries exactly one JSON document. Whatever a library prints while planning goes to stderr,
    # and a user error is a JSON object {"error": ...} (and the usual line on stderr), exit status 2.
    import contextlib

    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        try:
            entries = entries_for(args)
        except ValueError as e:
            print(f"scalesft plan: error: {e}", file=sys.stderr)
            print(json.dumps({"error": str(e)}), file=out)
            return 2
    print(json.dumps(entries, indent=2), file=out)
    if all("error" in e for e in entries):  # each world size's entry says why; none can run
        print(f"scalesft plan: error: world size {entries[0]['world_size']}: {entries[0]['error']}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_plan_arguments(argparse.ArgumentParser(prog="scalesft plan", description=__doc__.split("\n")[0]))
    return plan_cli(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
