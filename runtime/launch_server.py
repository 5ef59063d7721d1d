"""``python -m radixlm.runtime.launch_server --model-path DIR ...`` (SGLang's habit); same as ``radixlm serve``."""

from radixlm.runtime.server.launch_server import main

if __name__ == "__main__":
    main()
