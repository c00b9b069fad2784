"""scalesft: one QLoRA/LoRA SFT trainer that scales unchanged from one GPU to multi-node DDP, ZeRO-2/3 and FSDP2.

The installed package maps the checkout's top-level folders (pyproject.toml [tool.setuptools.package-dir]):

    scalesft.core     core/      pure: recipe types, batch plan, strategy specification, memory/FLOP model
    scalesft.launch   launch/    the CLI: plan, render and run `accelerate launch`, Slurm
    scalesft.trainer  trainer/   one training process (TRL's SFTTrainer)

Imports run one way: launch -> core <- trainer. No generic top-level names (`trainer`, `launch`) are installed;
from the checkout root `python -m trainer.train` still runs the trainer.
"""

__version__ = "0.1.0"

# From a checkout that is not installed (PYTHONPATH=checkout, as slurm/train.sh sets it; a GPU box with the stack but
# not this package), scalesft.core/.launch/.trainer are the checkout's own folders beside this one.
import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "core")) and all(
        _os.path.isfile(_os.path.join(_checkout, d, "__init__.py")) for d in ("core", "launch", "trainer")):
    __path__.append(_checkout)  # noqa: F821 - the package's own search path
del _os, _checkout
