"""The package layout holds: imports go down the layers only, modules import without cycles and without side effects
on the environment, every job is both a script and an installed command, and every benchmark runs as a script."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import the ones before it, never one after it (README.md, "Layout").
LAYERS = ("gpt2", "cluster", "serving", "workflow", "jobs")
# gpt2/ is the model library: usable with PyTorch alone.
GPT2_FORBIDDEN = ("ray", "mlflow", "fastapi", "starlette", "pydantic")


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """Names this file imports: every `import a.b` / `from a.b import c` (as a.b and a.b.c). Module level means the
    file's own statements, so `if TYPE_CHECKING:` imports, never executed, do not count there."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imports_go_down_the_layers_only():
    wrong = []
    for name, path in _modules().items():
        layer = LAYERS.index(name.split(".")[0])
        for imported in _imports(path, module_level_only=False):
            top = imported.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                wrong.append(f"{name} imports {imported} (a layer above it)")
            if layer == 0 and top in GPT2_FORBIDDEN:
                wrong.append(f"{name} imports {imported} (gpt2/ stays pure PyTorch)")
    assert not wrong, "\n".join(wrong)


def test_modules_import_without_cycles():
    """Module-level imports form no cycle. (An import inside a function runs on use; `GPT.from_pretrained` reaching
    into gpt2.checkpoint, which builds a GPT, is such a facade.)"""
    modules = _modules()
    edges = {name: {m for m in _imports(path, module_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(edges[name]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_importing_the_project_sets_nothing_in_the_environment():
    """Settings such as Ray's auth mode or MLflow's HTTP timeouts are made where a head starts or a client connects.
    The libraries themselves are imported first: what they set on import is theirs."""
    code = f"""
import importlib, json, os
for lib in ("torch", "ray", "ray.data", "ray.train", "ray.train.torch", "ray.tune", "ray.serve", "mlflow",
            "mlflow.pyfunc", "fastapi", "tiktoken", "pyarrow.fs"):
    importlib.import_module(lib)
before = dict(os.environ)
for name in {sorted(_modules())!r}:
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps(changed))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_job_is_an_installed_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    jobs = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__")
    assert scripts == {f"gpt2-{job.replace('_', '-')}": f"jobs.{job}:main" for job in jobs}
    for job in jobs:
        tree = ast.parse((ROOT / "jobs" / f"{job}.py").read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"jobs/{job}.py: no main()"
    # The installed command runs from anywhere, like the script.
    command = Path(sys.executable).parent / "gpt2-generate"
    out = subprocess.run([str(command), "--help"], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: gpt2-generate"), out.stderr[-2000:]


def test_no_job_changes_sys_path():
    """`python jobs/X.py` puts jobs/ first on sys.path; no job is named like a package of the project or a module of
    the standard library, so none needs to patch it."""
    for path in sorted((ROOT / "jobs").glob("*.py")):
        assert path.stem not in LAYERS and path.stem not in sys.stdlib_module_names, (
            f"{path} would stand in for the {path.stem} module")
        uses = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)
                and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not uses, f"{path}:{uses[0]} uses sys.path"


def test_every_ray_connection_goes_through_init_ray():
    """Jobs start the same way whatever Ray is running (no head, `make demo`'s head, a token head, RAY_ADDRESS):
    that logic lives in cluster.runtime.ray_env.init_ray, which tests/test_job_startup.py runs in each situation,
    so no other module calls ray.init."""
    calls = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls and all(c.startswith("cluster/runtime/ray_env.py:") for c in calls), calls


def _benchmark_scripts() -> list[Path]:
    """The runnable files of benchmarks/ (those with a __main__ block; engine_load is a module they share)."""
    return [p for p in sorted((ROOT / "benchmarks").glob("*.py")) if '__name__ == "__main__"' in p.read_text()]


def test_every_benchmark_runs_as_a_script_from_anywhere():
    """`python benchmarks/X.py --help`, from any directory, prints the usage and exits 0 without measuring anything,
    as `python -m benchmarks.X --help` does (the benchmarks package is installed with the others, so a benchmark
    that imports another one needs no path fix)."""
    scripts = _benchmark_scripts()
    assert {p.stem for p in scripts} >= {"run_all", "bench_serve", "bench_model", "gpu_check"}

    def usage(path: Path) -> tuple[Path, subprocess.CompletedProcess]:
        return path, subprocess.run([sys.executable, str(path), "--help"], cwd="/", capture_output=True, text=True,
                                    timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:  # each imports torch: two at a time on a 2-core machine
        for path, out in pool.map(usage, scripts):
            assert out.returncode == 0 and out.stdout.startswith("usage:"), (
                f"`python {path.relative_to(ROOT)} --help` exited {out.returncode}:\n{out.stderr[-2000:]}")


def test_run_all_takes_benchmark_names():
    from benchmarks.run_all import BENCHMARKS, parse_args

    assert parse_args([]).names == BENCHMARKS
    assert parse_args(["serve", "bench_model"]).names == ["bench_serve", "bench_model"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "serve", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no benchmark named 'nope'" in out.stderr and "bench_serve" in out.stderr
    assert out.stdout == ""  # refused before any benchmark started
