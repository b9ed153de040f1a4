"""CAMEx Serve HTTP server: TGI/TEI/OpenAI-compatible routes over `camex_runtime.Engine`.

`server.app.create_app(settings)` builds the ASGI app; `camex-server` (server.cli) runs it.
This package speaks HTTP only; models, caches and scheduling live in `camex_runtime`.
"""

__version__ = "0.1.0"
