"""The layering is a contract, not a hope: `lint-imports` (import-linter) with the contracts in
pyproject.toml must pass, and each contract must be able to fail."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as lint; sys.exit(lint())"]


def _lint(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_layering_contracts_are_kept():
    proc = _lint()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    contracts = ("Layers", "No import circles", "The service submits eval jobs", "Each CLI command", "The bottom rooms")
    for contract in contracts:
        assert contract in proc.stdout and "BROKEN" not in proc.stdout


@pytest.mark.parametrize(
    "module, source, contract",
    [
        # an upward import: the seam reaching the model
        ("mitigation/seam/zz_upward.py", "import vlm.loader\n", "Layers"),
        # a circle inside one room: two seam modules importing each other
        ("mitigation/seam/zz_a.py", "from mitigation.seam import zz_b\n", "No import circles"),
        # the service running an eval job itself
        ("serve/zz_job.py", "import evals.job\n", "The service submits eval jobs"),
        # the pure world importing Lucid
        ("testbed/world/zz_impure.py", "import grounding\n", "The bottom rooms"),
        # one command module taking another's helper (SAM_HELP once went that way)
        ("lucid/cli/serve_cmd.py", "from lucid.cli.segment_cmd import register\n", "Each CLI command"),
    ],
)
def test_each_contract_fails_on_the_mistake_it_names(tmp_path, module, source, contract):
    """A copy of the tree with one planted mistake: lint-imports must name the broken contract."""
    tree = tmp_path / "tree"
    packages = ("lucid", "vlm", "mitigation", "grounding", "lucid_kernels", "serve", "evals", "testbed")
    files = [p.relative_to(ROOT) for pkg in packages for p in (ROOT / pkg).rglob("*.py")] + [Path("pyproject.toml")]
    for rel in files:
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((ROOT / rel).read_bytes())
    target = tree / module
    target.write_text((target.read_text() if target.exists() else "") + source)
    if module.endswith("zz_a.py"):
        (tree / "mitigation/seam/zz_b.py").write_text("from mitigation.seam import zz_a\n")
    proc = subprocess.run(
        [*LINT],
        capture_output=True,
        text=True,
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, proc.stdout[-3000:]


def test_lucid_ships_no_top_level_package_that_transformers_imports_by_name():
    """transformers >= 5.25 depends on Hugging Face's kernel-hub client, imported as `kernels`; a Lucid package
    of that name (Lucid's kernels lived there until 2026-12) shadows it from the repository root and
    `import transformers.modeling_utils` fails. Lucid's top-level packages must not take the names of
    transformers' own dependencies, and loading the modeling code from the repository root must work."""
    from importlib.metadata import requires

    names = (re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in requires("transformers") or [])
    taken = {n.lower().replace("-", "_") for n in names}
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert not ours & taken, f"Lucid packages named like transformers' dependencies: {sorted(ours & taken)}"
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers.modeling_utils, transformers.models.llava"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
