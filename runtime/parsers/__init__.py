"""Output parsers for chat models: tool calls (one parser per model family) and reasoning text.

Used by the OpenAI chat route, SGLang's ``/parse_function_call`` and ``/separate_reasoning`` endpoints and the
DSL's ``separate_reasoning``. Parsers are pure text → structure functions: no tokenizer, no server state.
"""
