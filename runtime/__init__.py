"""radixlm.runtime: the serving runtime (Engine, scheduler, server)."""
