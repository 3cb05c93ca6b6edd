"""Tensor parallelism (Megatron style) for the engine: one model split over ``tp`` ranks.

Rank 0 is the engine's own process: scheduler, block pool and sampler live there only and
stay pure. Every step, rank 0 broadcasts the step's packed inputs (one small message: token
ids, positions, slots, block tables) to the other ranks, then every rank runs its shard of
the model on the same inputs and writes its own KV shard; the logits of the sampled rows
are gathered on rank 0, which samples. The next step's batch carries the sampled tokens, so
they are never sent separately.

How a layer is split (``sharding``)::

    q/k/v, gate/up   column-parallel: each rank holds its heads / intermediate rows
    o_proj, down     row-parallel: each rank's partial product, then one all-reduce (sum)
    embedding        vocab-parallel: rows [v0, v1), zeros elsewhere, one all-reduce
    LM head          vocab-parallel: logits [V / tp, n] per rank, gathered once on rank 0
    MoE block        experts split over ranks (``expert_range``), router replicated, the
                     shared expert split like a dense MLP; one all-reduce for the block
    KV cache         per rank: its KV heads only (one replicated head each when
                     tp > num_kv_heads, as vLLM does)

Modules: ``shard`` (which rows a rank owns; pure), ``comm`` (the group: all-reduce, step
broadcast, logits gather), ``sharding`` (splits a model built on the meta device),
``launch`` (starts the other ranks: local processes by default, swappable),
``runner`` (rank 0's model runner), ``worker`` (the other ranks' loop).
"""
