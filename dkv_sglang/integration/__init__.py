"""Everything that touches SGLang's internals lives here (one room to change on an upgrade)."""
