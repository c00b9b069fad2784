"""The recipe: typed fields, one clear error per mistake, every shipped recipe valid without loading weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scalesft.core.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": {"name_or_path": "m"}, "data": {"path": "d.json"}, "training": {"output_dir": "o"}}


def with_(section: str, **values) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe: Path):
    from scalesft.core.memory import choose_batching

    r = load_recipe(recipe)
    assert r.training.micro_batch_size == "auto"  # the planner chooses; the global batch is the recipe's
    for world in (1, 2, 4, 8, 16, 32):  # plans wherever the global batch holds one row per process
        if r.training.global_batch_size >= world:
            b = choose_batching(r, None, strategy="ddp", world_size=world, precision="bf16")
            assert b.global_batch_size == r.training.global_batch_size and b.micro_batch_tokens >= \
                r.data.max_seq_length
    assert r.model.trust_remote_code is False  # only when a recipe asks; none of ours needs it


@pytest.mark.parametrize("raw, message", [
    (with_("training", learnig_rate=1e-4), "unknown recipe key 'training.learnig_rate': did you mean 'learning_rate'?"),
    (with_("lora", rank=8), "unknown recipe key 'lora.rank'"),
    ({**BASE, "trainig": {}}, "unknown recipe key 'trainig': did you mean 'training'?"),
    (with_("training", micro_batch_size="4"), "training.micro_batch_size: expected int or one of 'auto', got '4' (str)"),
    (with_("training", micro_batch_size=4, micro_batch_tokens=4096),
     "training.micro_batch_tokens applies to training.micro_batch_size: auto, not 4"),
    (with_("training", micro_batch_tokens=512), "training.micro_batch_tokens=512 is below data.max_seq_length=1024"),
    (with_("training", gradient_checkpointing="yes"), "training.gradient_checkpointing: expected bool"),
    (with_("quantization", bits=3), "quantization.bits: expected one of 4, 8 or null, got 3"),
    (with_("lora", target_modules=5), "lora.target_modules: expected list or one of 'all-linear'"),
    ({"model": {"name_or_path": "m"}, "data": {"path": "d"}}, "the recipe has no 'training' section"),
    (with_("model", name_or_path=None), "model.name_or_path: expected str, got None"),
    ({**BASE, "model": {}}, "model.name_or_path is required"),
    (with_("training", micro_batch_size=64), "training.micro_batch_size (64) exceeds global_batch_size (32)"),
    (with_("data", format="alpaca", template="ko-qa"), "data.template uses {question}, which format 'alpaca'"),
    (with_("data", format="text", template="ko-qa"), "data.format=text takes data.template=plain"),
    (with_("data", fields={"q": "x"}), "data.fields has ['q'], which format 'qa' does not use"),
    (with_("data", template="Q: {answer} A: {question}"), "must end with the completion placeholder {answer}"),
])
def test_bad_recipe_gives_one_line_naming_the_field(raw, message):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = load_recipe(path, ["training.max_steps=7", "training.learning_rate=3e-4", "lora.target_modules=[q_proj]",
                           "quantization.bits=4"])
    assert (r.training.max_steps, r.training.learning_rate, r.lora.target_modules, r.quantization.bits) == \
        (7, 3e-4, ["q_proj"], 4)
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(path, ["max_steps"])
    with pytest.raises(RecipeError, match="unknown recipe key 'training.max_step'"):
        load_recipe(path, ["training.max_step=3"])


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file 'nope.yaml' does not exist"):
        load_recipe("nope.yaml")


def test_saved_recipes_hide_secrets_but_keep_token_counts():
    from scalesft.core.secrets import redacted

    out = redacted({"training": {"micro_batch_tokens": 4096, "hf_token": "hf_x", "wandb_api_key": "k",
                                 "client_secret": "s", "password": "p", "token": "t", "max_tokens": 3}}, {})
    assert out == {"training": {"micro_batch_tokens": 4096, "hf_token": "***", "wandb_api_key": "***",
                                "client_secret": "***", "password": "***", "token": "***", "max_tokens": 3}}
