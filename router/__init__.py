"""radixlm.router: a cache-aware HTTP router in front of several radixlm servers (``radixlm router``).

Modules, one job each:

* ``prefix_tree``: the approximate radix tree of the text the router sent to one worker;
* ``policy``: the routing rules (``cache_aware``, ``round_robin``, ``power_of_two``, ``random``), pure
  functions of the workers' loads and trees, shared with ``radixlm serve --dp-size``;
* ``request_key``: the routing key of each request kind (native, completions, chat);
* ``workers``: the worker set, health checks and the trees' correction from worker statistics;
* ``app``: the FastAPI proxy (forwarding, streaming passthrough, abort, failover);
* ``metrics``: Prometheus metrics per worker; ``args``: the command line; ``server``: uvicorn.
"""
