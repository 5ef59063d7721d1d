"""Constrained decoding: regex / JSON schema → outlines-core Index over the tokenizer's bytes, per-request
matchers that fill logit masks, and jump-forward (forced text appended without sampling).

Typical use in the scheduler::

    backend = GrammarBackend(tokenizer, vocab_size=model_vocab, eos_token_ids=eos_ids)
    fut = backend.submit("json", sampling_params.json_schema)   # or ("regex", sampling_params.regex)
    ...                                                         # keep decoding others until fut.done()
    matcher = fut.result().new_matcher()                        # ValueError → fail this request alone
    matcher.fill_mask(mask[i]); ...; matcher.accept_token(tok)
    jf = matcher.jump_forward(tok)                              # JumpForward(num_rollback, token_ids) or None
    if matcher.is_finished(): ...                               # only EOS can follow: end the request
"""

from radixlm.runtime.constrained.backend import GrammarBackend, grammar_key, validate_grammar
from radixlm.runtime.constrained.grammar import CompiledGrammar, GrammarMatcher, JumpForward
from radixlm.runtime.constrained.json_schema import JSON_OBJECT_SCHEMA, schema_to_regex
from radixlm.runtime.constrained.vocab import TokenizerVocab, build_vocab

__all__ = [
    "GrammarBackend",
    "validate_grammar",
    "grammar_key",
    "CompiledGrammar",
    "GrammarMatcher",
    "JumpForward",
    "JSON_OBJECT_SCHEMA",
    "schema_to_regex",
    "TokenizerVocab",
    "build_vocab",
]
