"""Benchmarks, run as ``python -m benchmarks.<name>`` from the repository root.

``python -m`` puts the root first on ``sys.path``; dropping it here keeps our ``kernels/`` folder from
answering transformers' probe for Hugging Face's ``kernels`` package (see radixlm.runtime.child_process).
"""

from radixlm.runtime.child_process import isolate_sys_path

isolate_sys_path()
