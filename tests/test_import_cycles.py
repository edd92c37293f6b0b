"""No import cycles between modules of oba_ext (issue 14): a static check of module-level
imports, and every module imported in a fresh process in sorted and in reverse order."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "oba_ext")


def _modules():
    mods = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3]
                name = rel.replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[: -len(".__init__")]
                mods[name] = os.path.join(d, f)
    return mods


def _top_level_imports(name, path, mods):
    """Modules of oba_ext imported at module level (not inside functions)."""
    is_pkg = path.endswith("__init__.py")
    pkg = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(open(path).read())
    out = set()

    def visit(stmts):
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(st, ast.Import):
                out.update(a.name for a in st.names if a.name in mods)
            elif isinstance(st, ast.ImportFrom):
                if st.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (st.level - 1)]
                    mod = ".".join(base + ([st.module] if st.module else []))
                else:
                    mod = st.module or ""
                for a in st.names:
                    if f"{mod}.{a.name}" in mods:
                        out.add(f"{mod}.{a.name}")
                    elif mod in mods:
                        out.add(mod)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(st, field, []) or [])
    visit(tree.body)
    out.discard(name)
    return out


def test_no_static_import_cycles():
    mods = _modules()
    graph = {m: _top_level_imports(m, p, mods) for m, p in mods.items()}
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles between oba_ext modules:\n" + "\n".join(cycles)


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_process(order):
    names = sorted(_modules())
    if order == "reversed":
        names = names[::-1]
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % (names,)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
