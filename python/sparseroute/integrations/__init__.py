"""Integrations of sparseroute into model libraries (imported on demand, never at package import)."""
