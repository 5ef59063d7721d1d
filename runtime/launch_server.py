"""Entry-point shim only: ``python -m radixlm.runtime.launch_server --model-path DIR ...`` (SGLang's habit).

Same as ``radixlm serve``; the launcher itself (processes, signals, HTTP) is
``radixlm.runtime.server.launcher``.
"""

from radixlm.runtime.server.launcher import main

if __name__ == "__main__":
    main()
