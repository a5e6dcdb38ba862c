"""Defaults and names of the explanation modules read from their source text (ast), without
importing them: the explain app's flags and ExplainOptions are defined from these, so that
the app checks its flags and files before TensorFlow loads. Each value still lives only in its
own module; tests/apps/test_hostile.py checks that these equal the imported ones."""

from __future__ import annotations

import ast
import functools
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
READ: set[tuple] = set()  # every value read, for the test that they equal the imported ones


@functools.lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    with open(os.path.join(_HERE, module + ".py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def default(where: str, param: str):
    """The default of `param` of `where` = "<module>.<function>" of research/explain (a
    literal)."""
    module, function = where.split(".")
    for node in _tree(module).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, value in pairs:
                if arg.arg == param:
                    READ.add(("default", where, param))
                    return ast.literal_eval(value)
    raise LookupError(f"research/explain/{module}.py: no default of {function}({param}=...)")


def _assigned(module: str, name: str) -> ast.expr:
    for node in _tree(module).body:
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value
    raise LookupError(f"research/explain/{module}.py: no module-level {name}")


def constant(module: str, name: str):
    """A module-level literal (a tuple of names, a number)."""
    READ.add(("constant", module, name))
    return ast.literal_eval(_assigned(module, name))


def keys(module: str, name: str) -> tuple:
    """The literal keys of a module-level dict, in order (outputs.EXAMPLE_FILTERS, ...)."""
    value = _assigned(module, name)
    if not isinstance(value, ast.Dict) or None in value.keys:
        raise LookupError(f"research/explain/{module}.py: {name} is not a dict of literal keys")
    READ.add(("keys", module, name))
    return tuple(ast.literal_eval(key) for key in value.keys)


def record_names(module: str, name: str) -> tuple:
    """The names of the records in a module-level tuple of calls (methods.METHODS): each
    call's `name=` keyword or first positional argument, a literal."""
    value = _assigned(module, name)
    if not isinstance(value, ast.Tuple) or not all(isinstance(c, ast.Call)
                                                   for c in value.elts):
        raise LookupError(f"research/explain/{module}.py: {name} is not a tuple of records")
    names = []
    for call in value.elts:
        named = [k.value for k in call.keywords if k.arg == "name"]
        names.append(ast.literal_eval(named[0] if named else call.args[0]))
    READ.add(("record_names", module, name))
    return tuple(names)
