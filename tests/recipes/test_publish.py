"""`dynsearch publish`: validated, written in the schema's canonical form under <root>/<model>/,
never silently replacing a different recipe, and the README index regenerated around kept text."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from dynsearch.cli import main
from dynsearch.errors import RecipeError
from dynsearch.recipes import publish as pub
from dynsearch.recipes import schema


def _recipe(name: str = "smol-100MB", kld: float = 0.0123, model: str = "SmolLM2-135M-Instruct",
            bytes_: int = 99_000_000) -> schema.Recipe:
    return schema.Recipe(
        name=name, model=schema.ModelInfo(model, "llama", "abc", 1000),
        tensors={"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_norm.weight": "F32"},
        budget={"spec": "100MB", "bytes": 100_000_000}, achieved={"bytes_estimate": bytes_, "bpw": 5.8765},
        kl={"kld_mean": kld, "kld_p99": 0.2468}, created="2026-01-02", dynsearch_version="0.1.0")


def _messy(tmp_path: Path, r: schema.Recipe, fname: str = "in.yaml") -> Path:
    """The same recipe in a non-canonical layout: keys reversed, flow style, lower-case types."""
    d = r.to_dict()
    d["tensors"] = {k: v.lower() for k, v in d["tensors"].items()}
    p = tmp_path / fname
    p.write_text(yaml.safe_dump(dict(reversed(list(d.items()))), sort_keys=False, default_flow_style=True))
    return p


def test_publish_writes_canonical_form_and_index(tmp_path):
    r = _recipe()
    root = tmp_path / "recipes"
    out = pub.publish(_messy(tmp_path, r), root=root)
    assert out.changed and out.path == root / "SmolLM2-135M-Instruct" / "smol-100MB.yaml"
    assert out.path.read_text() == r.dumps() and schema.load(out.path) == r
    readme = (root / "README.md").read_text()
    assert readme.startswith("# Published recipes")
    row = ("| SmolLM2-135M-Instruct | [smol-100MB](SmolLM2-135M-Instruct/smol-100MB.yaml) | 100MB | "
           "99,000,000 | 5.877 | 0.01230 | 0.2468 | 2026-01-02 |")
    assert row in readme.splitlines()
    # the same recipe again, in another layout: nothing changes
    again = pub.publish(_messy(tmp_path, r, "again.yaml"), root=root)
    assert not again.changed and (root / "README.md").read_text() == readme


def test_different_recipe_of_the_same_name_needs_force(tmp_path):
    root = tmp_path / "recipes"
    pub.publish(_messy(tmp_path, _recipe()), root=root)
    other = _messy(tmp_path, _recipe(kld=0.5), "other.yaml")
    with pytest.raises(RecipeError, match="already holds a different recipe named 'smol-100MB'.*--force"):
        pub.publish(other, root=root)
    assert schema.load(root / "SmolLM2-135M-Instruct" / "smol-100MB.yaml").kl["kld_mean"] == 0.0123
    assert pub.publish(other, root=root, force=True).changed
    assert schema.load(root / "SmolLM2-135M-Instruct" / "smol-100MB.yaml").kl["kld_mean"] == 0.5
    renamed = pub.publish(_messy(tmp_path, _recipe(kld=0.9), "third.yaml"), name="smol-alt", root=root)
    assert renamed.path.name == "smol-alt.yaml" and schema.load(renamed.path).name == "smol-alt"
    assert [r[1] for r in pub.index_rows(root)] == ["[smol-100MB](SmolLM2-135M-Instruct/smol-100MB.yaml)",
                                                    "[smol-alt](SmolLM2-135M-Instruct/smol-alt.yaml)"]


def test_index_keeps_surrounding_text_and_sorts(tmp_path):
    root = tmp_path / "recipes"
    root.mkdir()
    (root / "README.md").write_text(f"# Mine\n\nintro\n\n{pub.INDEX_START}\nold table\n{pub.INDEX_END}\n\nfooter\n")
    pub.publish(_messy(tmp_path, _recipe("b-big", bytes_=200)), root=root)
    pub.publish(_messy(tmp_path, _recipe("a-small", bytes_=100), "2.yaml"), root=root)
    pub.publish(_messy(tmp_path, _recipe("z", model="Another Model/v2"), "3.yaml"), root=root)
    text = (root / "README.md").read_text()
    assert text.startswith("# Mine\n\nintro\n\n") and text.endswith("\n\nfooter\n") and "old table" not in text
    assert [r[1].split("]")[0] for r in pub.index_rows(root)] == ["[z", "[a-small", "[b-big"]
    assert (root / "Another-Model-v2" / "z.yaml").is_file()


def test_bad_input_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_recipe().dumps().replace("Q4_K", "Q4_Z"))
    with pytest.raises(RecipeError, match=r"tensors.blk.0.attn_q.weight: unknown quant type 'Q4_Z'"):
        pub.publish(bad, root=tmp_path / "r")
    with pytest.raises(RecipeError, match="name: 'no/slash'"):
        pub.publish(_messy(tmp_path, _recipe()), name="no/slash", root=tmp_path / "r")
    with pytest.raises(RecipeError, match="recipe file not found"):
        pub.publish(tmp_path / "missing.yaml", root=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli(tmp_path, capsys):
    src = _messy(tmp_path, _recipe())
    root = tmp_path / "recipes"
    assert main(["publish", str(src), "--root", str(root)]) == 0
    assert "published" in capsys.readouterr().out
    assert main(["publish", str(src), "--root", str(root)]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["publish", str(_messy(tmp_path, _recipe(kld=1.0), "x.yaml")), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynsearch: error:") and err.count("\n") == 1


def test_published_recipes_ship_as_package_data():
    """Every recipe under recipes/<model>/ matches the package-data globs, and each is valid."""
    repo = Path(__file__).resolve().parents[2]
    conf = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = conf["package-data"]["dynsearch.recipes"]
    assert conf["package-dir"]["dynsearch.recipes"] == "recipes"
    for p in (repo / "recipes").glob("*/*.yaml"):
        rel = p.relative_to(repo / "recipes")
        assert any(rel.match(g) or Path("x", rel).match(g) for g in globs), rel
        schema.load(p)
    assert "*.md" in globs


@pytest.mark.parametrize("name", ["x\n", "..", "."])
def test_names_that_are_no_file_name_are_one_line(tmp_path, capsys, name):
    """issue 14 item 9: ``--name $'x\\n'`` wrote ``x\\n.yaml`` and split the index row; ``--name ..``
    wrote ``...yaml``."""
    root = tmp_path / "recipes"
    assert main(["publish", str(_messy(tmp_path, _recipe())), "--root", str(root), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynsearch: error:") and err.count("\n") == 1 and "may hold only" in err
    assert not root.exists()
