"""Classes of optional packages (transformers' ``Conv1D``) in oba_ext's type-keyed tables,
without importing those packages: an entry waits until the user has imported its module."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

#: an entry: (module path, class name, value for the table)
Pending = List[Tuple[str, str, Any]]


def resolve(pending: Pending, table: Dict[type, Any]) -> None:
    """Move the entries of ``pending`` whose module is in ``sys.modules`` into ``table``
    (``class -> value``; an existing entry wins). Entries whose module is not imported stay."""
    for entry in list(pending):
        mod = sys.modules.get(entry[0])
        if mod is None:
            continue
        pending.remove(entry)
        cls = getattr(mod, entry[1], None)
        if isinstance(cls, type):
            table.setdefault(cls, entry[2])
