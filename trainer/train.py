"""Train one recipe: QLoRA/LoRA SFT with TRL's SFTTrainer, the same code on 1 process or N.

Usage:
    python -m trainer.train RECIPE [section.key=value ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml -m trainer.train RECIPE [overrides]
    scalesft train RECIPE [overrides]

Order of work: recipe -> hardware checks -> strategy and batch plan -> data (tokenized once, cached) ->
model -> train (resuming from the newest complete checkpoint in output_dir when it holds the same run,
trainer/resume.py) -> adapter + metrics.
Every user error stops here with one line before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalesft.core.recipe import Recipe, RecipeError, load_recipe
from scalesft.core.secrets import redacted

from .console import say


@dataclass(kw_only=True)
class Resolved:
    """Everything decided for this run from the recipe, the hardware and the world size."""

    precision: str
    compute_dtype: str
    attn_implementation: str
    liger: bool
    strategy: Any
    batch: Any
    """core.batch.BatchPlan (rows per micro-batch) or, for token micro-batches, core.batch.TokenPlan once the
    data's lengths are known (None before)."""
    batching: Any = None
    """core.batch.Batching: what micro_batch_size (auto or an integer) means at this world size."""


def resolve(recipe: Recipe, hw=None, strategy=None) -> Resolved:
    """Hardware-, strategy- and batch-dependent choices. Initialises the process group; loads nothing."""
    from scalesft.core import hardware
    from scalesft.core.batch import BatchError
    from scalesft.core.memory import choose_batching

    from . import distributed
    from .assets import model_shape
    from .hardware import detect

    hw = hw or detect()
    hardware.check_quantization(recipe.quantization.bits, hw)
    prec = hardware.precision(recipe.training.precision, hw)
    liger = hardware.use_liger(recipe.model.liger_kernel, hw)
    strategy = strategy or distributed.resolve(hw, recipe, prec)
    try:
        batching = choose_batching(recipe, model_shape(recipe.model.name_or_path), strategy=strategy.name,
                                   world_size=strategy.world_size, precision=prec, gpu_gib=hw.gpu_memory_gib)
    except BatchError as e:
        raise RecipeError(str(e)) from None
    return Resolved(precision=prec, compute_dtype=hardware.torch_dtype_name(prec),
                    attn_implementation=strategy.layout.attention, liger=liger, strategy=strategy,
                    batch=batching.rows, batching=batching)


def load_data(recipe: Recipe, tokenizer, is_main: bool):
    """(train, eval or None, report): the local main process reads and tokenizes (cached), the other local ranks
    wait for its cache entry (trainer/data.py prepare)."""
    from accelerate import PartialState

    from .data import prepare

    state = PartialState()
    train_set, eval_set, report = prepare(
        recipe.data, tokenizer, seed=recipe.training.seed, local_main=state.is_local_main_process,
        rank=state.process_index, timeout=recipe.training.ddp_timeout,
        log=lambda line: say(line))
    if is_main:
        say(report.line())
    return train_set, eval_set, report


def sft_config(recipe: Recipe, r: Resolved, has_eval: bool):
    from trl import SFTConfig

    t, d = recipe.training, recipe.data
    return SFTConfig(
        output_dir=t.output_dir,
        per_device_train_batch_size=r.batch.micro_batch_size,
        per_device_eval_batch_size=(r.batch.micro_batch_size if not r.batching.by_tokens else
                                    max(1, r.batching.micro_batch_tokens // d.max_seq_length)),
        gradient_accumulation_steps=r.batch.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        optim=t.optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=r.precision == "bf16",
        fp16=r.precision == "fp16",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": r.strategy.reentrant} if t.gradient_checkpointing else None,
        seed=t.seed,
        ddp_timeout=t.ddp_timeout,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotated after each checkpoint is complete (trainer/preemption.py rotate)
        eval_strategy="steps" if has_eval else "no",
        eval_on_start=has_eval,  # the held-out loss before training, to compare with the one after
        disable_tqdm=True,  # trainer/console.py prints one line per logged step
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        report_to=[] if t.report_to == "none" else [t.report_to],
        run_name=t.run_name,
        # Rows are already truncated to max_seq_length (data.py); TRL needs it only as the packing bin size.
        max_length=d.max_seq_length if d.packing or not d.padding_free else None,
        packing=d.packing,
        padding_free=d.padding_free or d.packing,
        packing_strategy="bfd",
        dataset_num_proc=None,
        remove_unused_columns=True,
        # Liger's RMSNorm/SwiGLU/RoPE kernels through TRL's public switch, applied when training starts; TRL turns
        # Liger's fused cross-entropy off (it would replace the forward TRL patches with its own fused LM head)
        use_liger_kernel=r.liger,
        **r.strategy.args,
    )


def wandb_environment(recipe: Recipe, output_dir: Path) -> dict[str, str]:
    """W&B settings for this run: one run id kept in output_dir, so a resumed or requeued job continues the
    same run; grouped and named by the Slurm job when there is one. Returned, applied by the caller."""
    id_file = output_dir / "wandb_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)  # W&B ids: letters and digits
        id_file.write_text(run_id)
    env = {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow", "WANDB_PROJECT": recipe.training.wandb_project}
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        env["WANDB_RUN_GROUP"] = f"slurm-{job}"
        if not recipe.training.run_name:  # a recipe's run_name wins (the Trainer passes it as name=)
            env["WANDB_NAME"] = f"slurm-{job}"
    return env


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest COMPLETE checkpoint (trainer/preemption.py: transformers writes checkpoints in place)."""
    from .preemption import latest_complete_checkpoint

    return latest_complete_checkpoint(output_dir)


def train(recipe: Recipe, *, train_dataset=None, eval_dataset=None, callbacks=(), hw=None, strategy=None,
          resolved: Resolved | None = None) -> dict[str, Any]:
    """Run training and return the metrics (also written to output_dir/train_metrics.json on rank 0).

    Pass train_dataset (a datasets.Dataset with input_ids and labels) to skip the text pipeline."""
    from .checks import preflight

    preflight(recipe)  # output_dir, model folder / hub, LoRA targets: before anything is loaded or written
    import yaml
    from transformers import set_seed

    from . import console, distributed, generate, metrics, preemption
    from . import resume as run_record
    from .model import fuse_lora, load_model, load_tokenizer, peft_config

    console.after_imports()
    r = resolved or resolve(recipe, hw, strategy)
    s = r.strategy
    is_main = s.rank == 0
    out = Path(recipe.training.output_dir)
    plan = run_record.plan(recipe, train_dataset=train_dataset)  # same run? finished? (trainer/resume.py)
    if plan.finished:
        if is_main:
            print(plan.finished_line(), flush=True)
        return {"finished_before": True, "global_step": plan.step, "resumed_from": plan.checkpoint}
    tokenizer = load_tokenizer(recipe.model)
    report = None
    if train_dataset is None:
        train_dataset, eval_dataset, report = load_data(recipe, tokenizer, is_main)
    if len(train_dataset) < s.world_size:
        raise RecipeError(f"{len(train_dataset)} training rows for {s.world_size} processes: every process needs "
                          "at least one row; use fewer processes or more data")
    moved = run_record.check_world_size(plan, world_size=s.world_size, train_rows=len(train_dataset),
                                        global_batch=recipe.training.global_batch_size, packing=recipe.data.packing)

    if is_main:
        for line in run_record.record(plan, world_size=s.world_size) + ([moved] if moved else []):
            print(line, flush=True)
        resolved_yaml = yaml.safe_dump(redacted(recipe.to_dict(), os.environ), allow_unicode=True, sort_keys=False)
        (out / "recipe.yaml").write_text(resolved_yaml)
        say(f"resolved recipe written to {out / 'recipe.yaml'}")
        if console.verbose():
            print(resolved_yaml, flush=True)
        if recipe.training.report_to == "wandb":
            env = wandb_environment(recipe, out)
            os.environ.update(env)
            say(f"wandb run id {env['WANDB_RUN_ID']} (resume=allow)")
    if r.batching.by_tokens:  # micro-batches of at most micro_batch_tokens: the accumulation follows the lengths
        from scalesft.core.batch import BatchError

        from .batching import plan_run, row_lengths

        lengths = row_lengths(train_dataset)
        t = recipe.training
        try:
            r.batch = plan_run(lengths, global_batch_size=t.global_batch_size, world_size=s.world_size,
                               budget=r.batching.micro_batch_tokens, seed=t.seed, max_steps=t.max_steps,
                               num_train_epochs=t.num_train_epochs)
        except BatchError as e:
            raise RecipeError(str(e)) from None
    b = r.batch
    micro = f"micro_batch_tokens={b.micro_batch_tokens}" if r.batching.by_tokens else f"micro_batch={b.micro_batch_size}"
    say(f"{s.log_line()} · {micro} grad_accum={b.gradient_accumulation_steps} "
        f"global_batch={b.global_batch_size} precision={r.precision} liger={r.liger}")
    if is_main:
        for note in s.layout.notes:
            say(note)

    args = sft_config(recipe, r, has_eval=eval_dataset is not None)
    model = load_model(recipe.model, recipe.quantization, dtype=r.compute_dtype, attn=r.attn_implementation,
                       strategy=s)
    samples = recipe.training.sample_prompts
    before = generate.answers(model, tokenizer, recipe, samples) if samples and is_main else []

    set_seed(recipe.training.seed)  # SFTTrainer attaches LoRA before Trainer seeds: same init on every rank
    throughput = metrics.ThroughputCallback()
    # USR1/SIGTERM -> all ranks checkpoint at the same step, exit; old checkpoints rotate once a new one is complete
    stopper = preemption.PreemptionCallback(save_total_limit=recipe.training.save_total_limit)
    trainer = _counting_trainer()(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                 processing_class=tokenizer, peft_config=peft_config(recipe.lora),
                                 callbacks=[throughput, stopper, *callbacks])
    console.install(trainer)  # one line per logged step instead of a progress bar and dicts
    if r.batching.by_tokens:
        from .batching import TokenBatchSampler, trainer_epoch

        trainer.token_batches = TokenBatchSampler(lengths, b, recipe.training.seed,
                                                  epoch_of=lambda: trainer_epoch(trainer))
    throughput.bind(trainer, recipe)  # token counts, per-log tokens/s, MFU and every rank's peak memory
    if s.layout.lora == "fused":  # scale+add of each LoRA projection folded into one GEMM (bench/RESULTS.md)
        fuse_lora(trainer.model)
    distributed.prepare_trainer(trainer, s)  # accelerate's state must match the launched strategy
    preemption.shield_trackers(trainer)  # a lost W&B connection stops W&B logging, never the run
    resume = plan.checkpoint
    if is_main:
        for path in preemption.remove_incomplete_after(out, resume):
            say(f"removed incomplete checkpoint {path}")
    if resume and is_main:
        say(f"resuming from {resume}")
    with run_record.save_errors(out, trainer):  # disk full / unwritable: one line, folder + free space
        trainer.train(resume_from_checkpoint=resume)
    if stopper.preempted(trainer.state):
        if is_main:
            preemption.write_status(f"preempted step={trainer.state.global_step}")
            say(f"preempted at step {trainer.state.global_step} of {trainer.state.max_steps}: "
                f"checkpoint {latest_checkpoint(out)}; a restart resumes there")
        _finish_wandb(recipe)
        return {"preempted": True, "global_step": trainer.state.global_step, "resumed_from": resume}
    with run_record.save_errors(out):
        trainer.save_model(str(out))
    distributed.rank_report(trainer, s, out)  # every rank: what really ran (+ adapter digest if SCALESFT_RANK_REPORT=1)

    result = metrics.summarize(trainer, throughput, trainer.loss_tokens, {
        "gradient_accumulation_steps": b.gradient_accumulation_steps,
        "micro_batch_size": None if r.batching.by_tokens else b.micro_batch_size,
        "micro_batch_tokens": b.micro_batch_tokens if r.batching.by_tokens else None,
        "global_batch_size": b.global_batch_size,
        "strategy": s.name,
        "precision": r.precision,
        "resumed_from": resume,
        "data": report.__dict__ if report else None,
    })
    if samples and is_main:
        after = generate.answers(trainer.model, tokenizer, recipe, samples)
        result["samples"] = [{"prompt": p, "before": x, "after": y} for p, x, y in zip(samples, before, after)]
        say("sample answers, before -> after training:")
        for row in result["samples"]:
            print(f"  Q {row['prompt']}  ·  before: {console.one_line(row['before'], 40)}  ·  after: "
                  f"{console.one_line(row['after'])}", flush=True)
    if is_main:
        metrics.write(out / "train_metrics.json", result)
        preemption.write_status(f"completed step={result['global_step']}")
        run_record.mark_completed(out, global_step=result["global_step"], **plan.run_length)
        for line in console.summary(result, str(out), samples[0] if samples else None, console.cli_command()):
            say(line)
    _finish_wandb(recipe)
    return result


def _finish_wandb(recipe: Recipe) -> None:
    """Close the W&B run (its summary is written then, not at interpreter exit); a no-op on other ranks."""
    if recipe.training.report_to == "wandb":
        import wandb

        from .preemption import trackers_lost

        if wandb.run is not None and not trackers_lost():  # a lost W&B service cannot finish the run
            wandb.finish()


def _counting_trainer():
    """Built lazily so that `--help` and recipe errors stay free of the heavy imports."""
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that also counts tokens (trainer/metrics.py: on the device, read at log steps) and, for
        micro-batches sized by tokens, trains on trainer/batching.py's batch sampler."""

        token_batches = None  # a TokenBatchSampler when micro_batch_size is auto on padding-free data
        token_counts = None  # device tensor: loss-bearing tokens, processed tokens, causal attention pairs

        @property
        def loss_tokens(self) -> int:
            return 0 if self.token_counts is None else int(self.token_counts[0])

        def get_train_dataloader(self):
            if self.token_batches is None:
                return super().get_train_dataloader()
            from .batching import token_dataloader

            return token_dataloader(self, self.token_batches)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                from .metrics import count_tokens

                self.token_counts = count_tokens(inputs, self.token_counts)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return CountingSFTTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from scalesft.core.errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=10")
    p.add_argument("--verbose", action="store_true", help="keep third-party warnings and progress bars; print "
                   "the resolved recipe")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .console import VERBOSE_ENV, error, quiet

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet()
    recipe = None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        train(recipe)
        from .preemption import shutdown

        shutdown()  # every rank leaves the process group together: a clean exit 0
    except RecipeError as e:
        from .resume import SaveError

        if int(os.environ.get("RANK", "0")) == 0 or isinstance(e, SaveError):
            error(str(e))
        return 2
    except RuntimeError as e:  # a collective past training.ddp_timeout: the traceback, then one line naming it
        from .distributed import collective_timeout_line

        line = collective_timeout_line(e, recipe.training.ddp_timeout) if recipe else None
        if line is None:
            raise
        import traceback

        traceback.print_exc()
        error(line)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
