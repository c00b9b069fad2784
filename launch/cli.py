"""scalesft: the friendly front of the trainer and the launcher.

    scalesft train RECIPE [section.key=value ...]        train (one process here; any launcher option such as
                                                          --gpus/--strategy/--device runs accelerate launch)
    scalesft plan RECIPE --nodes N --gpus-per-node G      batch/precision/command per world size
    scalesft slurm RECIPE --nodes N --gpus-per-node G     render (--dry-run) or submit (--submit) a Slurm job
    scalesft generate OUTPUT_DIR "question"              answer one prompt, streaming
    scalesft chat OUTPUT_DIR                              talk to a trained adapter
    scalesft merge OUTPUT_DIR MERGED_DIR                  base + adapter -> one 16-bit model

Heavy imports happen inside the subcommands, so `scalesft --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from scalesft.launch.run import launcher_requested, train_cli

    if launcher_requested(args):  # any of --gpus/--strategy/--device/--port/--accelerate-config/--dry-run
        return train_cli(args)   # through accelerate launch (1 process unless --gpus), where each option acts
    from scalesft.trainer.train import main as train_main

    return train_main([args.recipe, *args.overrides, *(["--verbose"] if args.verbose else [])])


def _generate(args: argparse.Namespace) -> int:
    from scalesft.trainer.generate import answer, load_trained

    model, tokenizer, recipe = load_trained(args.output_dir, trust_remote_code=args.trust_remote_code)
    answer(model, tokenizer, recipe, args.prompt, max_new_tokens=args.max_new_tokens, stream=True,
           sample=args.sample)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from scalesft.trainer.generate import answer, load_trained

    model, tokenizer, recipe = load_trained(args.output_dir, trust_remote_code=args.trust_remote_code)
    print("scalesft chat: type a question, an empty line or Ctrl-D to quit.\n> ", end="", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        answer(model, tokenizer, recipe, line.strip(), max_new_tokens=args.max_new_tokens, stream=True,
               sample=args.sample)
        print("> ", end="", flush=True)
    print(flush=True)  # leave the terminal on a fresh line at Ctrl-D
    return 0


def _merge(args: argparse.Namespace) -> int:
    from scalesft.trainer.generate import merge

    merged = merge(args.output_dir, args.merged_dir, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {merged}")
    return 0


def _add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own code when the run's recipe.yaml asks for it "
                        "(model.trust_remote_code); refused otherwise")


def make_parser() -> argparse.ArgumentParser:
    from scalesft.core.errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="scalesft", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=10")
    from scalesft.launch.run import add_launch_options

    add_launch_options(t)
    t.add_argument("--verbose", action="store_true",
                   help="keep third-party warnings and progress bars; print the resolved recipe")
    t.set_defaults(func=_train)

    from scalesft.launch.plan import add_plan_arguments, plan_cli

    pl = sub.add_parser("plan", help="micro batch, accumulation, precision, QLoRA settings, command per world size")
    add_plan_arguments(pl).set_defaults(func=plan_cli)

    from scalesft.launch.slurm import add_arguments as add_slurm_arguments, run_cli as slurm_cli

    sl = sub.add_parser("slurm", help="render (--dry-run) or submit (--submit) slurm/train.sh for N nodes x G GPUs")
    add_slurm_arguments(sl)
    sl.set_defaults(func=slurm_cli)

    for name, func in (("generate", _generate), ("chat", _chat)):
        g = sub.add_parser(name, help=f"{name} with a trained adapter")
        g.add_argument("output_dir", help="a finished run's training.output_dir")
        if name == "generate":
            g.add_argument("prompt")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
        _add_trust_remote_code(g)
        g.set_defaults(func=func)

    m = sub.add_parser("merge", help="merge the adapter into the base model (16-bit)")
    m.add_argument("output_dir")
    m.add_argument("merged_dir")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    _add_trust_remote_code(m)
    m.set_defaults(func=_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    from scalesft.core.recipe import RecipeError

    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`train R --gpus 2 training.max_steps=5`): argparse leaves those over.
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from scalesft.trainer.console import VERBOSE_ENV, quiet

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # also for the processes accelerate launch starts
    quiet()
    try:
        return args.func(args)
    except RecipeError as e:
        print(f"scalesft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
