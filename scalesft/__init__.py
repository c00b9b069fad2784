"""scalesft: one QLoRA/LoRA SFT trainer that scales unchanged from one GPU to multi-node DDP, ZeRO-2/3 and FSDP2.

The installed package maps the checkout's top-level folders (pyproject.toml [tool.setuptools.package-dir]):

    scalesft.core     core/      pure: recipe types, batch plan, strategy specification, memory/FLOP model
    scalesft.launch   launch/    the CLI: plan, render and run `accelerate launch`, Slurm
    scalesft.trainer  trainer/   one training process (TRL's SFTTrainer)

Imports run one way: launch -> core <- trainer. No generic top-level names (`trainer`, `launch`) are installed;
from the checkout root `python -m trainer.train` still runs the trainer.
"""

__version__ = "0.1.0"
