"""The layering is a contract, not a hope: `lint-imports` (import-linter) with the contracts in
pyproject.toml must pass, and each contract must be able to fail."""

import importlib.util
import subprocess
import sys
import textwrap
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
    packages = ("lucid", "vlm", "mitigation", "grounding", "kernels", "serve", "evals", "testbed")
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


def test_transformers_does_not_take_lucids_kernels_for_the_kernels_hub():
    """Hugging Face's kernel-hub client is also imported as `kernels`; transformers resolves the name through
    the installed distributions and would call `kernels.get_kernel` on Lucid's package if the version it
    reads were in its accepted range. It must not report the hub as available because of Lucid."""
    from transformers.utils import import_utils

    spec = importlib.util.find_spec("kernels")
    if spec is None or not str(spec.origin).startswith(str(ROOT)):
        pytest.skip("`kernels` is not Lucid's here")
    import_utils.is_kernels_available.cache_clear()
    assert not import_utils.is_kernels_available(), textwrap.dedent(
        """transformers takes Lucid's `kernels` for the kernel hub (the version it reads from Lucid's
        distribution is inside the hub's accepted range): rename the top-level package or keep the version out"""
    )
    import kernels

    assert not hasattr(kernels, "get_kernel")
