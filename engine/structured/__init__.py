"""Structured outputs: constrain generation to a JSON schema, a regex, a choice or a grammar.

    from engine.structured import StructuredSpec
    params = SamplingParams(max_tokens=200, structured=StructuredSpec.json_schema(schema))

Life of a constrained request in an engine:
  1. the spec is validated when it is built (``InvalidStructuredSpec``, a ValueError);
  2. ``add_request`` / ``reserve`` / ``fork``: the engine compiles it for its tokenizer
     (cached per (tokenizer, spec)) into the request's ``GrammarState`` and advances that
     by the output tokens the request already has (a resume);
  3. every sample: the sampler masks the request's logits row with the grammar's bitmask
     (batched for the step) after logit bias, before penalties, temperature and top-k/p;
  4. every output token, the first one included (``activate`` on a decode worker), advances
     the state; a preemption (recompute) adds no token, so nothing is advanced twice;
  5. the grammar allows the stop token only once it is complete; accepting it ends the
     request with finish reason "stop". A token the grammar refuses (only possible for
     tokens generated without it elsewhere) ends it with "error".

Only ``spec`` is imported here eagerly: it needs no torch (the router builds specs). The
grammar engine (xgrammar) is imported on first use.
"""

from engine.structured.spec import KINDS, InvalidStructuredSpec, StructuredSpec, check

__all__ = ["KINDS", "InvalidStructuredSpec", "StructuredSpec", "check"]
