"""Adapters to the internals of third-party libraries whose APIs move between releases.

``calibra.compat.transformers`` is the one place calibra reaches into transformers beyond its public
loading API; each assumption it makes is tested on its own (tests/compat)."""
