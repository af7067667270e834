"""Helpers the library and kernel tests share (tests/ is on sys.path through tests/conftest.py)."""


def graph_names(tensor) -> set[str]:
    """Names of every autograd node behind tensor."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names
