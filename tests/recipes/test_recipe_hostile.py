"""Hostile recipe YAML: whatever the text, ``schema.loads`` returns a Recipe or raises one RecipeError
line; PyYAML's own exceptions (unhashable keys, impossible dates, broken tags) never leak."""

from __future__ import annotations

import random
import time

import pytest

from dynsearch.errors import RecipeError
from dynsearch.recipes import schema
from dynsearch.recipes.schema import ModelInfo, Recipe

pytestmark = pytest.mark.timeout(120)

RECIPE = Recipe(name="m-100MB", model=ModelInfo("M", "llama", "ab" * 32, 1000),
                tensors={"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_K", "output_norm.weight": "F32"},
                budget={"spec": "100MB", "bytes": 100_000_000}, kl={"kld_mean": 0.01},
                search={"types": ["Q4_K", "Q8_0"], "seed": 0}, created="2026-11-23", dynsearch_version="0.1.0")


@pytest.mark.parametrize("text,message", [
    ("? [a, b]\n: 1\n", "a key must be a plain value, not a list"),
    ("format: 1\n? {x: 1}\n: 2\n", "a key must be a plain value, not a dict"),
    ("created: 2026-13-45\n", "not valid YAML: ValueError"),
    ("a: !!timestamp nope\n", "not valid YAML"),
    ("a: !!float xyz\n", "not valid YAML"),
    ("a: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ("a: &x [1]\nb: *x\n", "aliases are not allowed"),
    ("a: " + "[" * 50 + "]" * 50 + "\n", "nesting deeper than"),
    ("name: x\nname: y\n", "duplicate key 'name'"),
])
def test_hostile_yaml(text, message):
    with pytest.raises(RecipeError, match=message) as e:
        schema.loads(text)
    assert "\n" not in str(e.value)


SPECIAL = ["? [a, b]\n: 1\n", "!!python/object:os.system x", "&a [*a]", "{", "]", ":", "- ", "\t",
           "%YAML 1.1\n", "!!binary AAAA", "<<: *x", "? ", "\x00", "\ufeff", '"\\x', "'", "!!set {a}",
           "!!omap [a: 1]", "2026-13-45", "1e400", "0x1F", "~", "|", ">", "!!timestamp 2001-12-14t2",
           "!!int 0xZZ", "!!float abc", "\n  - ", ": [", "{a: 1, a: 2}"]


def test_random_mutations_load_or_fail_cleanly():
    text = RECIPE.dumps()
    assert schema.loads(text) == RECIPE
    rng = random.Random(11)
    loaded = rejected = 0
    for _ in range(2000):
        t = list(text)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(t))
            r = rng.random()
            if r < 0.4:
                t[at:at] = list(rng.choice(SPECIAL))
            elif r < 0.7:
                del t[at:at + rng.randint(1, 10)]
            else:
                t[at] = chr(rng.randrange(32, 127))
        try:
            assert isinstance(schema.loads("".join(t)), Recipe)
            loaded += 1
        except RecipeError as e:
            assert "\n" not in str(e)
            rejected += 1
    print(f"recipe mutations: 2000, {loaded} loaded, {rejected} rejected")
    assert rejected > 500 and loaded > 100


# ------------------------------------------------------------------- sizes and names (issue 14)


def test_an_endless_file_is_read_only_up_to_the_limit():
    """``apply /dev/zero ...`` read until MemoryError at 2 GB."""
    with pytest.raises(RecipeError, match=r"^/dev/zero: recipe is larger than 4 MB$"):
        schema.load("/dev/zero")


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        schema.load(tmp_path)


@pytest.mark.parametrize("body", [
    "[" + ",".join(["0"] * 1_000_000) + "]",  # 2 MB of one flow list: 36 s and 845 MB before
    "\n".join(f"  k{i}: {i}" for i in range(150_000)),  # a block mapping of 150,000 entries
])
def test_too_many_values_are_refused_before_building(body):
    text = RECIPE.dumps().replace("search:\n", "search:\n  big: " + body + "\n" if body[0] == "[" else
                                  "search:\n  big:\n" + body + "\n", 1)
    assert len(text) < schema.MAX_BYTES
    t0 = time.process_time()
    with pytest.raises(RecipeError, match="more than 100,000 values"):
        schema.loads(text)
    assert time.process_time() - t0 < 5  # the check stops at the limit: well under a second here


def test_a_recipe_of_many_tensors_still_loads():
    """Far past any model (40,000 tensors: a 2,000-layer MoE) is well inside the limits."""
    tensors = {f"blk.{i // 20}.t{i % 20}.weight": "Q4_K" for i in range(40_000)}
    r = Recipe(name="big", model=ModelInfo("M", "llama"), tensors=tensors)
    assert schema.loads(r.dumps()) == r


@pytest.mark.parametrize("name", ["x\n", "x\r", "..", ".", "...", "a/b", "", " x", "x\n\n"])
def test_names_that_are_no_file_name_are_refused(name):
    """``publish --name $'x\\n'`` wrote ``x\\n.yaml`` (``$`` matches before a final newline);
    ``--name ..`` wrote ``...yaml``."""
    with pytest.raises(RecipeError, match="name: .* may hold only letters, digits") as e:
        schema.from_dict({**RECIPE.to_dict(), "name": name})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["a", ".a", "a.", "v1.2-100MB", "x_y", "..a"])
def test_names_with_dots_and_letters_are_accepted(name):
    assert schema.from_dict({**RECIPE.to_dict(), "name": name}).name == name
