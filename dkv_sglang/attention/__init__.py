"""Attention over the dkv pool: per request, per layer, exactly the rows that layer keeps."""
