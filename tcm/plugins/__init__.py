"""Action and policy handler plugins: the built-ins live here; others join via __path__.

Third-party packages add handlers by shipping a module in a `tcm/plugins/` directory of their
own (no __init__.py there); `pluginPackagePaths` makes twisted.plugin find it.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
